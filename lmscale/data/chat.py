"""Chat records as training sequences: the conversation rendered by the tokenizer's chat template, and which
of its tokens are loss targets (every assistant message with data.chat_loss=all, the last one with `last`;
a message whose data.train_field is false is left out).

The assistant tokens are found in one of two ways, as TRL's SFTTrainer does for the first:
- a template with `{% generation %}` markers says itself which tokens the assistant wrote
  (`return_assistant_tokens_mask`);
- otherwise each assistant message's bounds are where the conversation rendered up to it (with the
  generation prompt) and through it end, each of which must be a prefix of the whole rendering. The text
  between bounds is tokenized piece by piece, so a prompt's tokens are what they are at inference, where
  generation starts right after the generation prompt. A template that renders an earlier turn differently
  once later messages follow (some drop earlier reasoning) cannot be split this way: a one-line error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmscale.errors import ConfigError

MISSING = "missing: "  # a problem that names the record field a record lacks (as lmscale.data.tasks reads it)
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class ChatLoss:
    """Which assistant messages are targets."""

    scope: str = "all"  # "all": every assistant message; "last": the final message only
    train_field: str = "train"  # a message with this field false is not a target


@dataclass
class ChatSequence:
    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) token positions that are loss targets

    @property
    def targets(self) -> int:
        return sum(end - start for start, end in self.spans)


def chat_problem(messages, loss: ChatLoss = ChatLoss("last")) -> str | None:
    """Why a chat record cannot be trained on, or None."""
    if messages is None:
        return f"{MISSING}messages"
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        return "every message needs a role and a string content"
    if loss.scope == "last" and messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (it is the target)"
    if not trained_messages(messages, loss):
        return f"no assistant message to train on (each is missing or has {loss.train_field}: false)"
    return None


def trained_messages(messages: list[dict], loss: ChatLoss) -> list[int]:
    """Indices of the assistant messages that are targets."""
    chosen = [len(messages) - 1] if loss.scope == "last" else range(len(messages))
    return [
        i
        for i in chosen
        if messages[i]["role"] == "assistant" and messages[i].get(loss.train_field, True) is not False
    ]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


def assistant_bounds(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], whole: str, trained: list[int]
) -> dict[int, tuple]:
    """{trained message index: (start, end) character offsets in `whole`}, from rendered prefixes."""
    bounds, previous_end = {}, 0
    for index in trained:
        before = render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        through = render(tokenizer, messages[: index + 1])
        if not (whole.startswith(before) and whole.startswith(through) and previous_end <= len(before)):
            raise ConfigError(
                f"{template_name(tokenizer)} renders the conversation up to message {index + 1} as something other "
                "than a prefix of the whole (it renders earlier turns differently once later ones follow): use a "
                "template with {% generation %} markers around assistant output, or data.chat_loss=last"
            )
        bounds[index] = (len(before), len(through))
        previous_end = len(through)
    return bounds


def sequence_from_bounds(
    tokenizer: PreTrainedTokenizerBase, whole: str, bounds: dict[int, tuple], trained: list[int]
) -> ChatSequence:
    """Token ids of `whole`, tokenized between the bounds, with the trained messages' tokens as spans."""
    cuts = sorted({0, len(whole), *(offset for pair in bounds.values() for offset in pair)})
    pieces = [whole[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    starts, ids = {}, []
    for cut, piece_ids in zip(cuts, encoded, strict=False):
        starts[cut] = len(ids)
        ids += piece_ids
    starts[len(whole)] = len(ids)
    spans = [(starts[bounds[i][0]], starts[bounds[i][1]]) for i in trained]
    return ChatSequence(ids, spans)


def sequence_from_markers(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], trained: list[int]
) -> ChatSequence:
    """Token ids of the conversation and the spans the template's generation markers give the trained
    assistant messages (the k-th marked run is the k-th assistant message)."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = list(encoded["assistant_masks"])
    runs = marked_runs(mask)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(runs) != len(assistants):
        raise ConfigError(
            f"{template_name(tokenizer)} marks {len(runs)} assistant span(s) with {{% generation %}} in a "
            f"conversation of {len(assistants)} assistant message(s): fix its markers, or data.chat_loss=last"
        )
    by_message = dict(zip(assistants, runs, strict=True))
    return ChatSequence(list(encoded["input_ids"]), [by_message[i] for i in trained])


def marked_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    runs, start = [], None
    for position, value in enumerate([*mask, 0]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            runs.append((start, position))
            start = None
    return runs


def chat_sequence(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, loss: ChatLoss, max_seq_len: int
) -> ChatSequence | None:
    """The conversation's tokens and target spans, cut to max_seq_len; None when no target is left. The
    final assistant message is closed with EOS (a target) where the template closes it with no EOS of
    its own, so the model learns to stop."""
    trained = trained_messages(messages, loss)
    if GENERATION_MARKER.search(str(getattr(tokenizer, "chat_template", "") or "")):
        sequence = sequence_from_markers(tokenizer, messages, trained)
    else:
        whole = render(tokenizer, messages)
        bounds = assistant_bounds(tokenizer, messages, whole, trained)
        sequence = sequence_from_bounds(tokenizer, whole, bounds, trained)
    close_with_eos(sequence, tokenizer.eos_token_id, ends_with_assistant=trained[-1:] == [len(messages) - 1])
    return cut_to(sequence, max_seq_len)


def close_with_eos(sequence: ChatSequence, eos: int, ends_with_assistant: bool) -> None:
    """Append EOS as a target when the conversation ends with a trained reply that holds no EOS."""
    last = sequence.spans[-1] if ends_with_assistant and sequence.spans else None
    if last is None or last[1] != len(sequence.ids) or eos in sequence.ids[last[0] : last[1]]:
        return
    sequence.ids.append(eos)
    sequence.spans[-1] = (last[0], last[1] + 1)


def cut_to(sequence: ChatSequence, max_seq_len: int) -> ChatSequence | None:
    """The first max_seq_len tokens; position 0 is never a target (nothing precedes it)."""
    spans = [(max(start, 1), min(end, max_seq_len)) for start, end in sequence.spans]
    spans = [(start, end) for start, end in spans if start < end]
    if not spans:
        return None
    return ChatSequence(sequence.ids[:max_seq_len], spans)
