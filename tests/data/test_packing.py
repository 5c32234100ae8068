from dataclasses import replace

import pytest
import torch
from helpers import tiny_gpt2_config
from transformers import AutoModelForCausalLM, LlamaConfig

from lmscale.data.batches import IGNORE_INDEX, Batch, collate, collate_packed, seq_len_cap, truncate_batch
from lmscale.objectives.loss import summed_token_loss

VOCAB = 50


def model(family: str, attn: str):
    torch.manual_seed(0)
    if family == "gpt2":
        config = tiny_gpt2_config(VOCAB)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB,
            max_position_embeddings=32,
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_do_not_attend_to_each_other(family, attn):
    doc_a, doc_b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    lm = model(family, attn)
    packed = collate_packed([[doc_a, doc_b]], pad_id=0, width=12)
    with torch.no_grad():
        packed_logits = lm(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        alone = lm(input_ids=torch.tensor([doc_b])).logits
    torch.testing.assert_close(packed_logits[0, 5:9], alone[0], rtol=1e-4, atol=1e-5)


def test_packed_labels_skip_each_documents_first_token():
    packed = collate_packed([[[5, 6, 7], [8, 9]]], pad_id=0, width=8)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    i = IGNORE_INDEX
    assert packed["labels"].tolist() == [[i, 6, 7, i, 9, i, i, i]]
    logits = torch.zeros(1, 8, VOCAB)
    assert summed_token_loss(logits, packed["labels"]).item() == pytest.approx(
        3 * torch.log(torch.tensor(50.0)).item()
    )


def test_seq_len_warmup_caps_and_recounts():
    assert [seq_len_cap(s, 64, 256, 100) for s in (0, 50, 99)] == [64, 160, 248]
    assert seq_len_cap(100, 64, 256, 100) is None and seq_len_cap(5, 64, 256, 0) is None
    tensors = collate([list(range(1, 11)), [1, 2, 3]], pad_id=0)
    batch = Batch(
        tensors,
        real_tokens=13,
        padded_tokens=20,
        sequences=2,
        sum_sq_len=109,
        local_targets=11,
        group_targets=99,
        group_lengths=torch.tensor([10, 3, 7]),
    )
    cut = truncate_batch(batch, 4)
    assert cut["input_ids"].shape == (2, 4)
    assert cut.real_tokens == 7 and cut.padded_tokens == 8 and cut.sum_sq_len == 16 + 9
    assert cut.local_targets == 3 + 2  # this rank's rows
    assert cut.group_targets == 3 + 2 + 3  # min(len, 4) - 1 over every rank's sequences
    streamed = truncate_batch(replace(batch, group_targets=None, group_lengths=None), 4)
    assert streamed.group_targets is None and streamed.local_targets == 5
