"""The ``atm-ray`` command line.

    atm-ray config show --preset paper
    atm-ray prepare --preset tiny [key.sub=value ...]
    atm-ray pretrain --stage 1 --preset tiny
    atm-ray distill --student intermediate --preset tiny
    atm-ray finetune --preset tiny [--model DIR | --scratch] [--data FORMAT:PATH ...] [--freeze-encoder]
    atm-ray evaluate --models scratch=DIR pipeline=DIR [--data FORMAT:PATH] [--baseline scratch]
    atm-ray sweep --preset tiny --student final [--name NAME] [--fresh]
    atm-ray pipeline --preset tiny [--overrides-file runs/tiny/sweep_final/best_overrides.yaml]
    atm-ray report runs/tiny
    atm-ray serve --model A=DIR --model B=DIR --split 90:10 [--shadow B] [--port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from atm_ray.config import INFERENCE_BACKENDS, AtmRayError, load_config
from atm_ray.train.stage_table import DISTILL_STAGES, PRETRAIN_STAGES
from atm_ray.utils import RunFolderBusy, console_logging, run_folder_lock

# bench/cpu_backends.py: ONNX Runtime int8 ran the 17M student's batch-1 forward in 0.4-0.7x torch int8's time
BACKEND_HELP = ("onnxruntime (default: exported once per model and cached, the fastest on CPUs) or torch "
                "(eager; the one for a GPU)")
# commands that write into a run folder: one at a time per folder
WRITES_RUN_FOLDER = ("prepare", "pretrain", "distill", "finetune", "pipeline", "sweep")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny, cpu, paper, or a YAML file")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the run's stages write (default: the preset's run_dir)")
    parser.add_argument(
        "--overrides-file", action="append", default=[], metavar="FILE",
        help="a YAML mapping of preset values, e.g. a sweep's best_overrides.yaml (repeatable; key=value wins)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override preset values")


def _config(args):
    config = load_config(args.preset, args.overrides, args.overrides_file)
    if args.run_dir is not None:
        config.run_dir = str(args.run_dir)
    return config


def command_config_show(args) -> None:
    from atm_ray.train.modeling import count_parameters

    config = _config(args)
    vocab_size = config.tokenizer.vocab_size
    print(f"preset {config.name}: vocabulary {vocab_size:,}, sequence length {config.data.max_seq_len}")
    header = f"{'model':14s} {'layers':>6s} {'hidden':>6s} {'heads':>5s} {'ffn':>6s} {'embedding':>14s} {'non-embedding':>14s} {'total':>14s}"
    print(header)
    for name, shape in config.models.items():
        count = count_parameters(shape, vocab_size)
        print(
            f"{name:14s} {shape.num_layers:6d} {shape.hidden_size:6d} {shape.num_heads:5d} {shape.intermediate_size:6d} "
            f"{count.embedding:14,d} {count.non_embedding:14,d} {count.total:14,d}"
        )
    if args.full:
        print(config.model_dump_json(indent=2))


def command_prepare(args) -> None:
    from atm_ray.data.prepare import format_summary, prepare

    print(format_summary(prepare(_config(args), force=args.force)))


def command_pretrain(args) -> None:
    from atm_ray.train.stages import run_pretrain_stage

    print(run_pretrain_stage(_config(args), stage=args.stage, use_ray=not args.no_ray).summary())


def command_distill(args) -> None:
    from atm_ray.train.stages import run_distill

    for result in run_distill(_config(args), args.student, use_ray=not args.no_ray):
        print(result.summary())


def _finetune_config(args):
    from atm_ray.nlu.finetune import with_data_arguments

    config = _config(args)
    config.finetune = with_data_arguments(config.finetune, args.data, args.dev, args.test, config.data.root)
    if getattr(args, "freeze_encoder", False):
        config.finetune.freeze_encoder = True
    return config


def command_finetune(args) -> None:
    from atm_ray.nlu.finetune import finetune_summary, run_finetune
    from atm_ray.train.stage_table import FINETUNE_SCRATCH, FINETUNE_STUDENT

    config = _finetune_config(args)
    name = args.name or (FINETUNE_SCRATCH if args.scratch else FINETUNE_STUDENT) + ("_frozen" if args.freeze_encoder else "")
    print(finetune_summary(run_finetune(config, args.model, scratch=args.scratch, name=name, use_ray=not args.no_ray)))


def command_evaluate(args) -> None:
    from atm_ray.nlu.evaluate import compare_models, comparison_report, write_comparison
    from atm_ray.nlu.finetune import load_nlu_data, read_sources

    config = _finetune_config(args)
    models = {}
    for item in args.models:
        name, equals, directory = item.partition("=")
        if not equals or not name or not directory:
            raise AtmRayError(f"--models {item!r} is not NAME=DIR")
        models[name] = Path(directory)
    if args.data or args.test:
        sources = config.finetune.test or config.finetune.train
        records, _ = read_sources(sources, config.data.root, config.data.strict)
        description = ", ".join(f"{source.format}:{source.path}" for source in sources)
    else:
        records = load_nlu_data(config.finetune, config.data.root, config.data.strict, config.seed).test
        description = f"the test split of preset {config.name}"
    result = compare_models(models, records, args.baseline)
    print(comparison_report(result, description))
    output = args.output or config.resolved_run_dir() / "evaluation"
    markdown, json_path = write_comparison(result, output, description)
    print(f"written: {markdown}, {json_path}")


def command_serve(args) -> None:
    import signal
    import time

    import pydantic

    from atm_ray.cluster import init_ray
    from atm_ray.serve.app import build_app, parse_arm_arguments, set_ingress

    settings = {
        "arms": parse_arm_arguments(args.model, args.split),
        "shadow": args.shadow,
        "salt": args.salt,
        "max_batch_size": args.max_batch_size,
        "num_replicas": args.replicas,
        "num_cpus": args.cpus_per_replica,
        "torch_threads": args.torch_threads,
        "quantize": None if args.quantize == "none" else args.quantize,
        "backend": args.backend,
        "top_k": args.top_k,
        "fallback_intent": args.fallback_intent,
        "fallback_threshold": args.fallback_threshold,
        "state_dir": args.state_dir,
    }
    try:
        application = build_app(settings)
    except pydantic.ValidationError as error:
        raise AtmRayError(f"serve settings: {error}") from None
    if args.address or os.environ.get("RAY_ADDRESS"):
        print(f"note: on a running cluster its own environment decides the ingress (see serve/README.md); --ingress {args.ingress} applies to a local Ray")
    else:
        set_ingress(args.ingress)
    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not "Started Serve in namespace ..." and the like

    def stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop ends as cleanly as Ctrl-C, even mid-start
    try:
        init_ray(args.address, dashboard=False)  # Serve needs no state API; the dashboard's processes cost a 2-core machine
        # ray.init installs its core's fatal-signal handler, which turns SIGTERM into an abort: ours again
        signal.signal(signal.SIGTERM, stop)
        # no INFO line per request (or per cancelled request) from the proxy and replicas
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(application, name="atm-ray-nlu", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port}/v1/parse (arms: {', '.join(arm['name'] for arm in settings['arms'])}; "
              f"ingress: {args.ingress}; API docs at /docs); Ctrl-C stops", flush=True)
        if args.detach:
            return
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping: Serve drains its requests and shuts down", flush=True)
        if ray.is_initialized():
            try:
                # the A/B state first: a slow shutdown may not leave the ledger time for its own last write
                serve.get_deployment_handle("AbLedger", app_name="atm-ray-nlu").save.remote().result(timeout_s=30)
            except Exception as error:  # not deployed yet (stopped mid-start), or already gone
                logging.getLogger(__name__).debug("A/B state not saved at stop: %s", error)
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        print("stopped", flush=True)


def command_predict(args) -> None:
    from atm_ray.nlu.predict import predict_file

    use_ray = True if args.ray else False if args.no_ray else None
    summary = predict_file(
        args.model, args.input, args.output, use_ray=use_ray, on_error=args.on_error,
        quantize=None if args.quantize == "none" else args.quantize, backend=args.backend, top_k=args.top_k, batch_size=args.batch_size,
        actors=args.actors, threads_per_actor=args.threads_per_actor, address=args.address,
    )
    print(summary.summary())


def command_pipeline(args) -> None:
    from atm_ray.pipeline import run_pipeline

    run_pipeline(_config(args))


def command_sweep(args) -> int:
    from atm_ray.train.sweep import SweepInterrupted, run_sweep

    config = _config(args)
    if args.student:
        config.sweep.student = args.student
    try:
        print(run_sweep(config, name=args.name, fresh=args.fresh).summary())
    except SweepInterrupted as interrupted:
        print(f"atm-ray: {interrupted}", file=sys.stderr)
        return 3
    return 0


def command_report(args) -> None:
    from atm_ray.report import write_report

    print(f"written: {write_report(args.run_dir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atm-ray", description="Alexa Teacher Model pipeline on Ray")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    config_parser = commands.add_parser("config", help="inspect presets")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="model shapes and parameter counts (no weights allocated)")
    _add_common(show)
    show.add_argument("--full", action="store_true", help="also print the whole resolved configuration")
    show.set_defaults(handler=command_config_show)

    prepare_parser = commands.add_parser("prepare", help="train the tokenizer and pack MLM shards")
    _add_common(prepare_parser)
    prepare_parser.add_argument("--force", action="store_true", help="redo even if up to date")
    prepare_parser.set_defaults(handler=command_prepare)

    pretrain_parser = commands.add_parser("pretrain", help="teacher pretraining, Stage 1 or 2, on Ray Train")
    _add_common(pretrain_parser)
    pretrain_parser.add_argument("--stage", type=int, choices=sorted(PRETRAIN_STAGES), required=True)
    pretrain_parser.add_argument(
        "--no-ray", action="store_true", help="run the engine loop in this process (or under torchrun), without Ray"
    )
    pretrain_parser.set_defaults(handler=command_pretrain)

    distill_parser = commands.add_parser(
        "distill", help="intermediate: distil from the teachers, then continue in-domain; final: distil the 17M"
    )
    _add_common(distill_parser)
    distill_parser.add_argument("--student", choices=tuple(DISTILL_STAGES), required=True)
    distill_parser.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    distill_parser.set_defaults(handler=command_distill)

    def add_data_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", action="append", default=[], metavar="FORMAT:PATH",
                         help="labelled data (repeatable; a JointBERT folder with train/dev/test gives all three splits)")
        sub.add_argument("--dev", action="append", default=[], metavar="FORMAT:PATH")
        sub.add_argument("--test", action="append", default=[], metavar="FORMAT:PATH")

    finetune_parser = commands.add_parser("finetune", help="joint intent + slot fine-tuning on Ray Train")
    _add_common(finetune_parser)
    finetune_parser.add_argument("--model", type=Path, default=None, help="encoder folder (default: the run's final student)")
    finetune_parser.add_argument("--scratch", action="store_true", help="the same architecture from random weights (the baseline)")
    finetune_parser.add_argument("--name", default=None, help="stage folder name under the run folder")
    finetune_parser.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    finetune_parser.add_argument("--freeze-encoder", action="store_true", help="train the heads only")
    add_data_arguments(finetune_parser)
    finetune_parser.set_defaults(handler=command_finetune)

    evaluate_parser = commands.add_parser("evaluate", help="score fine-tuned models and compare them with a baseline")
    _add_common(evaluate_parser)
    evaluate_parser.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    evaluate_parser.add_argument("--baseline", default=None, help="the model others are compared with (default: the first)")
    evaluate_parser.add_argument("--output", type=Path, default=None, help="folder for comparison.md/json (default: <run>/evaluation)")
    add_data_arguments(evaluate_parser)
    evaluate_parser.set_defaults(handler=command_evaluate)

    serve_parser = commands.add_parser("serve", help="the intent/slot HTTP endpoint on Ray Serve, with A/B arms")
    serve_parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="an arm (repeatable)")
    serve_parser.add_argument("--split", default=None, help="traffic weights in arm order, e.g. 90:10 (default: equal)")
    serve_parser.add_argument("--shadow", default=None, metavar="NAME", help="run this arm off the request path only")
    serve_parser.add_argument("--salt", default="atm-ray", help="experiment salt of the sticky user assignment")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    # 2 replicas x 1 thread served 222 req/s at 16 connections against 181 for 1 x 2 (2-core machine, 17M int8,
    # bench/serve_latency.py, same 1-connection p50): one single-threaded replica per core
    serve_parser.add_argument("--replicas", type=int, default=2, help="replicas (default: 2, one per core of a 2-core machine)")
    serve_parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    serve_parser.add_argument("--torch-threads", type=int, default=1, help="threads per replica")
    serve_parser.add_argument("--max-batch-size", type=int, default=16)
    serve_parser.add_argument("--quantize", choices=("int8", "none"), default="int8", help="dynamic int8 quantisation (default: faster on CPUs, same accuracy) or none (fp32)")
    serve_parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    serve_parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                              help="HTTP ingress: Ray's HAProxy high-throughput mode (default) or Serve's Python proxy")
    serve_parser.add_argument("--top-k", type=int, default=3, help="intents in each answer's ranking")
    serve_parser.add_argument("--fallback-intent", default=None, help="answered when the best intent is below --fallback-threshold")
    serve_parser.add_argument("--fallback-threshold", type=float, default=0.0)
    serve_parser.add_argument("--state-dir", default=None, help="keep the A/B ledger here across restarts (default: memory only)")
    serve_parser.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    serve_parser.add_argument("--detach", action="store_true", help="return once deployed (with --address)")
    serve_parser.set_defaults(handler=command_serve)

    predict_parser = commands.add_parser("predict", help="parse every utterance of a file (text, JSONL, Parquet) with a fine-tuned model")
    predict_parser.add_argument("--model", type=Path, required=True, help="a fine-tuned export folder")
    predict_parser.add_argument("--input", type=Path, required=True, help=".txt (one utterance a line), .jsonl ('text' field) or .parquet ('text' column)")
    predict_parser.add_argument("--output", type=Path, required=True, help=".jsonl or .parquet: the endpoint's fields per utterance")
    predict_parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                                help="a malformed input line stops the run (default) or is skipped and reported")
    where = predict_parser.add_mutually_exclusive_group()
    where.add_argument("--ray", action="store_true", help="Ray Data with a pool of model actors (default above 20,000 utterances)")
    where.add_argument("--no-ray", action="store_true", help="in this process")
    predict_parser.add_argument("--actors", type=int, default=2, help="model actors under Ray")
    predict_parser.add_argument("--threads-per-actor", type=int, default=1)
    predict_parser.add_argument("--batch-size", type=int, default=64)
    predict_parser.add_argument("--quantize", choices=("int8", "none"), default="int8")
    predict_parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    predict_parser.add_argument("--top-k", type=int, default=3, help="intents in each answer's ranking")
    predict_parser.add_argument("--address", default=None, help="a running Ray cluster (implies --ray)")
    predict_parser.set_defaults(handler=command_predict)

    pipeline_parser = commands.add_parser("pipeline", help="every stage, skipping those already done")
    _add_common(pipeline_parser)
    pipeline_parser.set_defaults(handler=command_pipeline)

    sweep_parser = commands.add_parser("sweep", help="Ray Tune search over a distillation stage's weights (ASHA)")
    _add_common(sweep_parser)
    sweep_parser.add_argument("--student", choices=tuple(DISTILL_STAGES), default=None,
                              help="the stage to sweep (default: sweep.student of the preset)")
    sweep_parser.add_argument("--name", default=None, help="sweep folder under the run folder (default: sweep_<student>)")
    sweep_parser.add_argument("--fresh", action="store_true", help="delete an earlier sweep of that name first")
    sweep_parser.set_defaults(handler=command_sweep)

    report_parser = commands.add_parser("report", help="rebuild RUN_DIR/report.md and its plots from the stages' metrics")
    report_parser.add_argument("run_dir", type=Path)
    report_parser.set_defaults(handler=command_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_logging(args.verbose)
    command = " ".join(["atm-ray", *(argv if argv is not None else sys.argv[1:])])
    run_dir = None
    try:
        if args.command in WRITES_RUN_FOLDER:
            run_dir = _config(args).resolved_run_dir()
            with run_folder_lock(run_dir, command):
                code = args.handler(args)
        else:
            code = args.handler(args)
    except (AtmRayError, FileNotFoundError, RunFolderBusy) as error:
        if args.verbose:
            raise
        print(f"atm-ray: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\natm-ray: interrupted." + (
            " Finished stages are kept and the interrupted one resumes from its last checkpoint; to go on, run again:\n"
            f"  {command}" if run_dir else ""), file=sys.stderr)
        return 130
    except Exception as error:  # a failed stage (a worker's error comes through Ray Train) or a bug
        if args.verbose:
            raise
        print(f"atm-ray: {args.command} failed: {_reason(error)}", file=sys.stderr)
        print(f"atm-ray: the whole traceback is in {_save_traceback(run_dir)}"
              + (f"; the stages' own logs in {Path(run_dir) / 'logs'}" if run_dir else "") + " (-v shows everything here)",
              file=sys.stderr)
        return 1
    return code or 0


def _reason(error: BaseException) -> str:
    """One line: the innermost cause's last line (a worker's exception, not Ray's wrapping of it)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def _save_traceback(run_dir: Path | None) -> Path:
    import tempfile
    import time
    import traceback

    folder = Path(run_dir) / "logs" if run_dir else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"atm-ray-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(traceback.format_exc())
    return path


if __name__ == "__main__":
    sys.exit(main())
