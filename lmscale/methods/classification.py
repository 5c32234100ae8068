"""Sequence classification: a class head on the last real token, trained with cross-entropy on labelled
documents, reporting held-out accuracy."""

from lmscale.methods.base import Method, MethodFigures

CLASSIFICATION = Method(
    name="classification",
    key="finetune.task=classification",
    data_formats=("text",),
    figures=MethodFigures(
        loss_name="loss",
        loss_label="cross-entropy (nats/row)",
        panels=(("Accuracy", "share of rows classified right", ("accuracy", "eval_accuracy"), True),),
        summary_keys=("eval_loss", "eval_accuracy"),
        console=(("accuracy", "accuracy", "{:.3f}"),),
    ),
    accuracy_metric="accuracy",
    perplexity=False,
    class_head=True,
    target_unit="documents",
    whole_records=True,  # each document is one row with one label
    tensor_parallel=False,  # AutoTP splits a language model's output layer, not a class head
    sequence_parallel=False,
)
