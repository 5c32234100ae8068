"""Chat SFT targets every assistant turn: exactly the tokens of each assistant message and its end-of-turn
token, with real families' chat templates (TRL ships them; Mistral's is written here), found by the
template's generation markers or by rendering growing prefixes."""

from pathlib import Path

import pytest
import trl
from helpers import word_level_tokenizer

from lmscale.data.batches import collate
from lmscale.data.chat import ChatLoss, chat_problem, chat_sequence
from lmscale.data.tasks import PLAIN_CHAT_TEMPLATE, instruction_sequence
from lmscale.errors import ConfigError

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Mistral-7B-Instruct's template (v0.1), which no installed package ships.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# name: (template, its special tokens, end of turn = EOS, BOS, takes a system message)
FAMILIES = {
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>", "<|begin_of_text|>", True),
    "llama3.2": ("llama3_2.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|eot_id|>", "<|begin_of_text|>", True),
    "qwen2.5": ("qwen2_5.jinja", ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None, True),
    "qwen3-training": ("qwen3_training.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                       "<|im_end|>", None, True),
    "gemma": ("gemma.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<bos>", False),
    "gemma3-training": ("gemma3_training.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"],
                        "<end_of_turn>", "<bos>", False),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "</s>", "<s>", False),
}  # fmt: skip
WORDS = "hello how are you fine thanks what is two plus four be brief wrong".split()


def family_tokenizer(name: str):
    template, specials, eos, bos, _ = FAMILIES[name]
    tokenizer = word_level_tokenizer(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = template if "{" in template else (TEMPLATES / template).read_text()
    return tokenizer


def conversation(with_system: bool) -> list[dict]:
    turns = [
        {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four"},
    ]
    return [{"role": "system", "content": "be brief"}, *turns] if with_system else turns


def target_words(tokenizer, messages, loss: ChatLoss | None = None) -> list[list[str]]:
    sequence = chat_sequence(messages, tokenizer, loss or ChatLoss("all"), max_seq_len=512)
    return [tokenizer.convert_ids_to_tokens(sequence.ids[start:end]) for start, end in sequence.spans]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_assistant_message_and_its_end_of_turn_are_the_targets(family):
    tokenizer = family_tokenizer(family)
    end = tokenizer.eos_token
    spans = target_words(tokenizer, conversation(with_system=FAMILIES[family][4]))
    if family == "qwen3-training":  # Qwen 3 writes an (empty) reasoning block into every reply
        spans = [[t for t in span if t not in ("<think>", "</think>")] for span in spans]
    assert spans == [["fine", "thanks", end], ["four", end]]


@pytest.mark.parametrize("family", ["llama3", "gemma3-training", "mistral"])  # by prefixes, markers, prefixes
def test_a_message_marked_not_to_train_and_the_last_only_mode(family):
    tokenizer = family_tokenizer(family)
    messages = conversation(with_system=False)
    messages[1] = {**messages[1], "content": "wrong", "train": False}
    end = tokenizer.eos_token
    assert target_words(tokenizer, messages) == [["four", end]]
    assert target_words(tokenizer, conversation(False), ChatLoss("last")) == [["four", end]]
    messages[3] = {**messages[3], "keep": False}
    assert target_words(tokenizer, messages, ChatLoss("all", "keep")) == [["wrong", end]]
    messages[1]["keep"] = False
    assert "no assistant message to train on" in chat_problem(messages, ChatLoss("all", "keep"))


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line():
    """Qwen 3's own template drops the reasoning block of replies before the last user message, so a
    conversation's prefixes are not prefixes of it: no silent mis-mask (its training template works)."""
    tokenizer = family_tokenizer("qwen3-training")
    tokenizer.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    with pytest.raises(ConfigError, match=r"up to message 3 as something other than a prefix .*generation"):
        chat_sequence(conversation(with_system=True), tokenizer, ChatLoss("all"), 512)
    assert target_words(tokenizer, conversation(True), ChatLoss("last"))[0][-2:] == ["four", "<|im_end|>"]


def test_the_plain_template_closes_each_reply_with_eos_once_and_last_mode_is_as_before():
    tokenizer = word_level_tokenizer(WORDS, PLAIN_CHAT_TEMPLATE)
    messages = conversation(with_system=False)
    whole = chat_sequence(messages, tokenizer, ChatLoss("all"), 512)
    assert [tokenizer.convert_ids_to_tokens(whole.ids[a:b]) for a, b in whole.spans] == [
        ["fine", "thanks"],
        ["four", "<eos>"],  # the conversation's end: EOS so that the model learns to stop
    ]
    last = chat_sequence(messages, tokenizer, ChatLoss("last"), 512)
    # data.chat_loss=last is the former chat format: prompt, completion and EOS, the completion the target
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer([prompt, "four\n"], add_special_tokens=False)["input_ids"]
    before = instruction_sequence(encoded[0], encoded[1], tokenizer.eos_token_id, 512)
    assert last.ids == before["input_ids"] and [list(s) for s in last.spans] == before["target_spans"]


def test_cutting_to_max_seq_len_keeps_what_fits_and_labels_follow_the_spans():
    tokenizer = family_tokenizer("llama3")
    messages = conversation(with_system=False)
    whole = chat_sequence(messages, tokenizer, ChatLoss("all"), 512)
    first_reply_end = whole.spans[0][1]
    cut = chat_sequence(messages, tokenizer, ChatLoss("all"), first_reply_end - 1)
    assert cut.spans == [(whole.spans[0][0], first_reply_end - 1)] and len(cut.ids) == first_reply_end - 1
    assert chat_sequence(messages, tokenizer, ChatLoss("all"), whole.spans[0][0]) is None  # no target left
    labels = collate([whole.ids], pad_id=0, target_spans=[[list(s) for s in whole.spans]])["labels"][0]
    kept = [i for i, label in enumerate(labels.tolist()) if label != -100]
    assert kept == [i for start, end in whole.spans for i in range(start, end)]
    assert labels[kept].tolist() == [whole.ids[i] for i in kept]


def test_multi_turn_records_train_on_every_reply_through_the_data_pipeline(tmp_path):
    """From a jsonl file to sequences, with a tokenizer lmscale trains (the plain role: content template)."""
    import json

    from lmscale.config import DataConfig
    from lmscale.data.pipeline import prepare_data

    records = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
                {"role": "user", "content": "And times two?"},
                {"role": "assistant", "content": f"That is {4 * i}.", "train": i % 2 == 0},
            ]
        }
        for i in range(200)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = DataConfig(path=str(path), format="chat", cache_dir=str(tmp_path / "cache"), vocab_size=300)
    data = prepare_data(config)
    decode = data.tokenizer.decode
    for row in data.train.select(range(20)):
        replies = [decode(row["input_ids"][start:end]).strip() for start, end in row["target_spans"]]
        i = int(decode(row["input_ids"]).split("Question ")[1].split(":")[0])
        expected = [f"It is {2 * i}.", *([f"That is {4 * i}."] if i % 2 == 0 else [])]
        assert [r.removesuffix(data.tokenizer.eos_token).strip() for r in replies] == expected
        assert row["targets"] == sum(end - start for start, end in row["target_spans"])
