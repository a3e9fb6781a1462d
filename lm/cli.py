"""`lm <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from lm.config import ConfigError, load_config
from lm.runtime.host_memory import keep_freed_memory
from lm.train.preemption import Preempted

_USAGE_ERRORS = (ConfigError, FileNotFoundError, ValueError)
# Commands that run model steps, whose XLA:CPU temporaries reuse freed host memory.
_RUNS_STEPS = {"pretrain", "finetune", "bench", "evaluate", "generate", "chat"}


# Each handler imports its command when it runs: `lm --help` and argument errors then answer
# without importing JAX, TFDS or the model (seconds of start-up).


def _pretrain(args: argparse.Namespace) -> None:
    from lm.commands.pretrain import pretrain

    pretrain(load_config(args.config, args.overrides))


def _finetune(args: argparse.Namespace) -> None:
    from lm.commands.finetune import finetune
    from lm.train.init_from import finetune_config

    finetune(finetune_config(args.config, args.overrides))


def _bench(args: argparse.Namespace) -> None:
    from lm.commands.bench import bench

    bench(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup)


def _evaluate(args: argparse.Namespace) -> None:
    from lm.commands.evaluate import evaluate_run, evaluation_config, format_report

    cfg = evaluation_config(args.run_dir, args.config, args.overrides)
    report = evaluate_run(
        args.run_dir,
        cfg,
        step=args.step,
        split=args.split,
        max_batches=args.max_batches,
        pseudo_perplexity=args.pseudo_perplexity,
        output=args.output,
    )
    print(format_report(report))


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags `lm generate` and `lm chat` share, as Generator options."""
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {name: getattr(args, name) for name in (*names, "seed")}


def _generate(args: argparse.Namespace) -> None:
    from lm.commands.generate import generate

    generate(
        args.run_dir,
        args.prompt,
        args.prompts_file,
        step=args.step,
        as_json=args.json,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        stop=args.stop,
        truncate_prompt=args.truncate,
        overrides=args.overrides,
        **_sampling(args),
    )


def _chat(args: argparse.Namespace) -> None:
    from lm.commands.chat import chat

    chat(args.run_dir, step=args.step, system=args.system, **_sampling(args))


def _data_prepare(args: argparse.Namespace) -> None:
    from lm.commands.data import prepare_data

    prepare_data(
        load_config(args.config, args.overrides),
        shards=args.shards,
        workers=args.workers,
        process_index=args.process_index,
        process_count=args.process_count,
    )


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lm.commands.tokenizer import train

    print(
        train(args.input, args.output, args.vocab_size, args.model_type, args.validation_fraction)
    )


def _convert_from_hf(args: argparse.Namespace) -> None:
    from lm.commands.convert import from_hf

    print(from_hf(args.src, args.dst, args.overrides, overwrite=args.overwrite))


def _convert_to_hf(args: argparse.Namespace) -> None:
    from lm.commands.convert import to_hf

    print(to_hf(args.run_dir, args.dst))


def _plot(args: argparse.Namespace) -> None:
    from lm.commands.plot import plot

    print(plot(args.runs, args.out))


def _plan(args: argparse.Namespace) -> None:
    from lm.commands.plan import (
        format_compiled_plan,
        format_decode_plan,
        format_plan,
        plan_compiled,
        plan_decode,
        plan_memory,
        plan_target,
    )

    name = args.config or "defaults"
    if args.topology and args.gpu:
        raise ConfigError("--topology and --gpu each name the devices to compile for; give one.")
    if args.decode and not (args.topology or args.gpu):
        raise ConfigError(
            "--decode compiles for a TPU slice or GPUs; add --topology, e.g. v5e-8, or --gpu h100."
        )
    if args.topology or args.gpu:
        cfg = load_config(args.config, args.overrides)
        target = plan_target(args.topology, args.gpu)
        if args.decode:
            print(format_decode_plan(name, plan_decode(cfg, target)))
        else:
            print(format_compiled_plan(name, plan_compiled(cfg, target)))
        return
    if args.devices is None:
        import jax

        args.devices = jax.device_count()
    cfg = load_config(args.config, args.overrides)
    print(format_plan(args.config or "defaults", plan_memory(cfg, args.devices)))


def _distributed_flags(sub: argparse.ArgumentParser) -> None:
    """Explicit multi-host flags (otherwise LM_* / SLURM / Cloud TPU VM environment, or none)."""
    group = sub.add_argument_group("multi-host (all three, or none)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service")
    group.add_argument("--num-processes", type=int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process, 0 .. num_processes - 1")


def _join_distributed(args: argparse.Namespace) -> None:
    """Join a multi-host run before the command touches a device (no-op for one process)."""
    if hasattr(args, "coordinator"):
        from lm.runtime.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int, seed_help: str):
    """The flags of `_sampling`."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in [
        ("pretrain", _pretrain, "pretrain a causal language model (resumes an existing run dir)"),
        ("finetune", _finetune, "fine-tune a task head or SFT from a checkpoint (resumes too)"),
        ("bench", _bench, "measure train-step tokens/s and MFU on synthetic batches"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(run=run)
        sub.add_argument("--config", help="YAML file (see configs/)")
        sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
        _distributed_flags(sub)
        if name == "bench":
            sub.add_argument("--steps", type=int, default=10, help="timed steps")
            sub.add_argument("--warmup", type=int, default=2, help="untimed steps first")

    evaluate = commands.add_parser(
        "evaluate", help="perplexity, bits-per-byte or masked accuracy of a run on a data split"
    )
    evaluate.set_defaults(run=_evaluate)
    evaluate.add_argument(
        "--run", dest="run_dir", required=True, help="run directory (its newest checkpoint)"
    )
    evaluate.add_argument("--config", help="YAML for the data (default: the run's config.yaml)")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        help="e.g. data.source=tfds:lm1b data.packing=window data.stride=128 data.seq_len=256",
    )
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    evaluate.add_argument("--split", default="validation", help="data split (default validation)")
    evaluate.add_argument("--max-batches", type=int, default=0, help="stop early (0 = all)")
    evaluate.add_argument(
        "--pseudo-perplexity",
        action="store_true",
        help="masked-LM runs: also mask each token in turn (one forward pass per token)",
    )
    evaluate.add_argument("--output", help="report path (default RUN/eval/<what>.json)")

    generate = commands.add_parser(
        "generate", help="continue prompts with a trained causal LM (KV-cached decoding)"
    )
    generate.set_defaults(run=_generate)
    generate.add_argument("--run", dest="run_dir", required=True, help="run directory")
    generate.add_argument(
        "overrides",
        nargs="*",
        help="data.tokenizer=PATH (a run saved without its tokenizer) or mesh.*=N",
    )
    generate.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    generate.add_argument("--prompt", action="append", default=[], help="text (repeatable)")
    generate.add_argument("--prompts-file", help="one prompt per non-blank line")
    _add_sampling_flags(generate, max_new_tokens=128, seed_help="of the sampled tokens")
    generate.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    generate.add_argument("--length-penalty", type=float, default=1.0, help="beam ranking")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument(
        "--truncate", action="store_true", help="left-truncate prompts longer than the context"
    )
    generate.add_argument(
        "--json", action="store_true", help="one JSON line per prompt instead of streaming"
    )
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per batch (--json)")

    chat = commands.add_parser(
        "chat", help="chat with a trained causal LM in the terminal (/reset, /exit)"
    )
    chat.set_defaults(run=_chat)
    chat.add_argument("--run", dest="run_dir", required=True, help="run directory")
    chat.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    chat.add_argument("--system", default="", help="system message leading the conversation")
    _add_sampling_flags(chat, max_new_tokens=256, seed_help="of the first reply; +1 per turn")

    data = commands.add_parser("data", help="prepare tokenized data for pod-scale training")
    data_actions = data.add_subparsers(dest="action", required=True)
    prepare = data_actions.add_parser(
        "prepare",
        help="tokenize data.source once into sharded files under data.prepared (resumable)",
    )
    prepare.set_defaults(run=_data_prepare)
    prepare.add_argument("--config", help="YAML file (see configs/)")
    prepare.add_argument(
        "overrides", nargs="*", help="e.g. data.source=tfds:lm1b data.prepared=gs://b/lm1b"
    )
    prepare.add_argument("--workers", type=int, default=0, help="processes (0 = every CPU)")
    prepare.add_argument(
        "--shards", type=int, default=0, help="shards per split (0 = ~50k documents each)"
    )
    prepare.add_argument(
        "--process-index", type=int, default=0, help="this host, when several share the work"
    )
    prepare.add_argument("--process-count", type=int, default=1, help="hosts sharing the work")

    tokenizer = commands.add_parser("tokenizer", help="SentencePiece tokenizers")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a byte-fallback tokenizer on local text")
    train.set_defaults(run=_tokenizer_train)
    train.add_argument(
        "--input", required=True, help="a .txt file, a directory, a glob, or 'shakespeare'"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="pieces, reserved included")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--output", required=True, help="where to write the .model file")
    train.add_argument(
        "--validation-fraction",
        type=_fraction,
        default=0.05,
        help="share of files held out by path hash, not trained on (default 0.05)",
    )

    convert = commands.add_parser("convert", help="Hugging Face GPT-2 / Llama / BERT weights")
    directions = convert.add_subparsers(dest="action", required=True)
    from_hf = directions.add_parser("from-hf", help="HF model directory -> run directory")
    from_hf.set_defaults(run=_convert_from_hf)
    from_hf.add_argument("--src", required=True, help="directory with config.json + safetensors")
    from_hf.add_argument("--dst", required=True, help="run directory to create")
    from_hf.add_argument(
        "overrides", nargs="*", help="section.key=value for the run's config, e.g. data.seq_len=128"
    )
    from_hf.add_argument(
        "--overwrite", action="store_true", help="replace everything already in --dst"
    )
    to_hf = directions.add_parser("to-hf", help="run directory -> HF model directory")
    to_hf.set_defaults(run=_convert_to_hf)
    to_hf.add_argument("--run", dest="run_dir", required=True, help="run directory (newest step)")
    to_hf.add_argument("--dst", required=True, help="directory for config.json + safetensors")
    plot = commands.add_parser(
        "plot", help="loss, learning rate, grad norm and tokens/s of runs against step (PNG)"
    )
    plot.set_defaults(run=_plot)
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories, overlaid")
    plot.add_argument(
        "--out", help="PNG to write (default: RUN/curves.png, or curves.png for several runs)"
    )
    plan = commands.add_parser(
        "plan", help="memory per device of a config on a mesh (params, AdamW, activations)"
    )
    plan.set_defaults(run=_plan)
    plan.add_argument("--config", help="YAML file (see configs/)")
    plan.add_argument(
        "overrides", nargs="*", help="e.g. mesh.fsdp=-1 mesh.data=1 data.batch_size=256"
    )
    plan.add_argument(
        "--devices", type=int, help="devices to plan for (default: those this machine sees)"
    )
    plan.add_argument(
        "--topology",
        help="compile the real train step for a TPU slice on this host (needs libtpu): "
        "v5e-256, v5p-128 (TensorCores), v6e-64 or a topology such as v5p:4x4x4",
    )
    plan.add_argument(
        "--gpu",
        metavar="CARD[:N]",
        help="compile the real train step for N NVIDIA GPUs of one host (default 1) on this "
        "host, no GPU needed (needs lm[cuda]): h100, h200, a100-80gb, a100-40gb, l4, rtx4090",
    )
    plan.add_argument(
        "--decode",
        action="store_true",
        help="with --topology or --gpu, compile the decode step lm generate runs instead of the "
        "train step (data.batch_size rows, a model.max_seq_len-slot KV cache)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in _RUNS_STEPS:
        keep_freed_memory()
    try:
        _join_distributed(args)
        args.run(args)
    except Preempted as stop:  # SIGTERM or Ctrl-C: the step reached is checkpointed
        print(f"lm {args.command}: {stop}", flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (a second one in it exits at once)
        print(f"lm {args.command}: interrupted.", file=sys.stderr)
        return 130
    except _USAGE_ERRORS as error:
        print(f"lm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written, a full disk
        where = f" ({error.filename})" if error.filename else ""
        print(f"lm {args.command}: error: {error.strerror or error}{where}.", file=sys.stderr)
        return 2
    except RuntimeError as error:
        # Errors the user fixes outside the config (e.g. a full disk) carry exit_code 2.
        print(f"lm {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
