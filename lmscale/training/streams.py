"""This rank's batches: its share of the training data (planned or streamed) and of the held-out data, and
the training length they settle (train.max_tokens and train.epochs become steps)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import ValidationError

from lmscale.config import Config
from lmscale.data.batches import BatchSettings, BatchStream
from lmscale.data.epoch import batch_line, step_figures, steps_to_train, stop_key
from lmscale.data.pipeline import PreparedData
from lmscale.data.streaming import StreamingBatches, StreamSettings
from lmscale.errors import ConfigError
from lmscale.reporting.sink import log
from lmscale.runs.run import Run
from lmscale.training.loop import Streams


def batch_settings(run: Run) -> BatchSettings:
    """How this rank batches its data; in a sequence-parallel layout, its slice of every row."""
    config = run.config
    return BatchSettings(
        batching=config.data.batching,
        max_tokens_per_batch=config.data.max_tokens_per_batch,
        micro_batch_size=config.train.micro_batch_size,
        max_seq_len=config.data.max_seq_len,
        num_workers=config.data.num_workers,
        sequence_shard=(run.layout.sequence_rank(run.rank), run.layout.sequence),
    )


def fixed_stream(run: Run, sequences, pad_id: int) -> BatchStream:
    """Unshuffled batches of `sequences` in this rank's share, read in the main process (evaluation)."""
    settings = replace(batch_settings(run), num_workers=0)
    return BatchStream(
        sequences, settings, run.data_rank, run.layout.data, run.config.seed, pad_id, shuffle=False
    )


def batch_streams(run: Run, data: PreparedData) -> Streams:
    """This rank's training and held-out batches: its data-parallel replica's share (the ranks of a tensor or
    sequence group share their batches)."""
    config, settings, pad_id = run.config, batch_settings(run), data.tokenizer.pad_token_id
    if config.data.streaming:
        stream_settings = StreamSettings(
            settings, config.data.shuffle_buffer, config.data.dedup, config.seed, run.data_rank
        )
        train_stream = StreamingBatches(data.train, data.tokenizer, stream_settings)
    else:
        train_stream = BatchStream(data.train, settings, run.data_rank, run.layout.data, config.seed, pad_id)
    return Streams(train_stream, fixed_stream(run, data.eval, pad_id))


def settle_training_length(run: Run, train_stream) -> Run:
    """Say what an optimizer step really holds, and turn train.max_tokens / train.epochs into the step
    count the LR schedule needs (recorded in config.yaml as train.max_steps: what ran)."""
    config = run.config
    epoch = train_stream.epoch_figures() if isinstance(train_stream, BatchStream) else None
    figures = step_figures(config, epoch, run.layout.data)
    steps = steps_to_train(config, figures)
    log.info(batch_line(figures, steps, config))
    if config.train.max_steps is not None:
        return run
    try:
        return run.settled("train", max_steps=steps, max_tokens=None, epochs=None)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{stop_key(config)} comes to {steps} steps: {problem}") from None


def check_packing_support(config: Config) -> None:
    """Say plainly when packed documents would attend to each other (older transformers)."""
    if config.data.batching != "pack":
        return
    import transformers.masking_utils as masking

    if hasattr(masking, "find_packed_sequence_indices"):
        log.info("data: packing with per-document position ids; documents attend only within themselves")
    else:
        log.warning(
            "data: this transformers version ignores packed position ids: packed documents attend across boundaries"
        )
