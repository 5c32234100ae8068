"""`lmscale generate` stays inside the model's positions."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.evaluation.inference import Sampling, check_context


def test_generation_past_the_positions_is_refused_with_the_room_left():
    check_context(6, 250, 256)
    check_context(6, 10**6, None)  # a family that does not say: nothing to check
    with pytest.raises(
        LmscaleError, match="exceeds the model's 256 positions: use --max-new-tokens 250 or less"
    ):
        check_context(6, 300, 256)
    with pytest.raises(LmscaleError, match="shorten the prompt"):
        check_context(300, 1, 256)


def _chat_model_dir(tmp_path, template):
    """A tiny GPT-2 and a word-level tokenizer saved as an export is: with or without a chat template."""
    from helpers import tiny_gpt2_config, word_level_tokenizer
    from transformers import GPT2LMHeadModel

    words = ["user", "assistant", "system", ":"] + [f"w{i}" for i in range(40)]
    tokenizer = word_level_tokenizer(words, template)
    directory = tmp_path / ("chat" if template else "plain")
    GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer


def test_generate_chat_renders_the_saved_template_and_prints_the_reply(tmp_path, capsys):
    import json

    from lmscale.cli import main
    from lmscale.data.tasks import PLAIN_CHAT_TEMPLATE
    from lmscale.evaluation.inference import chat_prompt, generate_text, load_for_inference

    directory, tokenizer = _chat_model_dir(tmp_path, PLAIN_CHAT_TEMPLATE)
    conversation = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    assert chat_prompt(tokenizer, conversation) == "system: w1\nuser: w2 w3\nassistant: "
    greedy = ["--max-new-tokens", "5", "--temperature", "0"]
    assert main(["generate", str(directory), "--chat", "--prompt", "w2 w3", *greedy]) == 0
    reply = capsys.readouterr().out.rstrip("\n")
    model, loaded = load_for_inference(directory)
    expected = generate_text(
        model, loaded, "user: w2 w3\nassistant: ", Sampling(5, 0.0), add_special_tokens=False
    )
    assert reply == expected and "user" not in reply.split()[:1]  # the reply alone, not the prompt
    (tmp_path / "talk.json").write_text(json.dumps({"messages": conversation}))
    assert main(["generate", str(directory), "--messages", str(tmp_path / "talk.json"), *greedy]) == 0
    expected = generate_text(
        model, loaded, chat_prompt(loaded, conversation), Sampling(5, 0.0), add_special_tokens=False
    )
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_generate_chat_refusals_are_one_line(tmp_path, capsys):
    import json

    from lmscale.cli import main

    plain, _ = _chat_model_dir(tmp_path, None)
    assert main(["generate", str(plain), "--chat", "--prompt", "w1"]) == 1
    assert "has no chat template" in capsys.readouterr().err
    ends_with_reply = tmp_path / "done.json"
    ends_with_reply.write_text(
        json.dumps([{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}])
    )
    assert main(["generate", str(plain), "--messages", str(ends_with_reply)]) == 1
    assert "ends with the assistant's turn" in capsys.readouterr().err
    assert main(["generate", str(plain), "--messages", str(tmp_path / "none.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
