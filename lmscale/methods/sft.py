"""Supervised training of a language model: the cross-entropy of the next tokens (of documents, or of the
completions of instruction and chat records)."""

from lmscale.methods.base import Method, MethodFigures

SFT = Method(
    name="sft",
    key="finetune.method=sft",
    data_formats=("text", "prompt_completion", "chat"),
    figures=MethodFigures(
        loss_name="loss", loss_label="loss (nats/token)", panels=(), summary_keys=("eval_loss", "eval_ppl")
    ),
    expert_parallel=True,
)
