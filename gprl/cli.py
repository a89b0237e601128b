"""The `gprl` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from gprl.config import ConfigError, RunSpec, add_config_flags, apply_config_flags, dump_config, parse_config


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _read_yaml(path: str | None) -> Any:
    if not path:
        return {}
    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], path) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], path) from None


def _is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "GPRLRun"


def _load_raw(path: str | None) -> dict:
    raw = _read_yaml(path)
    if _is_manifest(raw):
        raw = {k: v for k, v in (raw.get("spec") or {}).items() if k != "suspend"}
    return raw


def cmd_train(args) -> int:
    from gprl.trainer import Trainer

    spec = parse_config(apply_config_flags(_load_raw(args.config), args), args.config)
    trainer = Trainer(spec)
    trainer.train()
    from gprl.distributed import shutdown

    shutdown()  # multi-rank runs: leave together, process group torn down before exit
    # Stopped by SIGTERM/SIGINT with a checkpoint: a clean, resumable stop (exit 0 unless told otherwise: the
    # operator asks for a code its Job's podFailurePolicy ignores, so the Job replaces the pod instead of
    # counting the index as complete).
    return args.exit_code_on_stop if trainer.step < spec.algo.steps else 0


def cmd_config(args) -> int:
    if args.schema:
        print(json.dumps(RunSpec.model_json_schema(by_alias=True), indent=2))
    else:
        doc = _read_yaml(args.config)
        if _is_manifest(doc):
            # a GPRLRun manifest gets the API server's verdict: camelCase only, plus the cluster's rules
            from gprl.api.manifest import parse_manifest

            doc = {**doc, "spec": apply_config_flags(doc.get("spec") or {}, args, camel=True)}
            spec = parse_manifest(doc, args.config)
        else:
            spec = parse_config(apply_config_flags(doc, args), args.config)
        sys.stdout.write(dump_config(spec))
    return 0


def cmd_gpm_train(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from gprl.gpm import GeneralPreferenceModel, GPMConfig, load_pairs, train_gpm

    from gprl.sources import resolve_model

    torch.manual_seed(args.seed)
    args.backbone = resolve_model(args.backbone, "--backbone")
    tok = AutoTokenizer.from_pretrained(args.backbone)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    chat = (lambda m: tok.apply_chat_template(m, tokenize=False)) if getattr(tok, "chat_template", None) else None
    train = load_pairs(args.data, chat_template=chat)
    evals = load_pairs(args.eval_data, chat_template=chat) if args.eval_data else []
    model = GeneralPreferenceModel.from_backbone(args.backbone, GPMConfig(axes=args.axes, beta=args.beta))
    res = train_gpm(model, tok, train, evals, epochs=args.epochs, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, margin=args.margin, axis_label_weight=args.axis_label_weight,
                    decorrelation=args.decorrelation, seed=args.seed, log=print)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "train_loss": res.train_loss, "eval_accuracy": res.eval_accuracy}))
    return 0


def cmd_eval(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl.evaluate import gpm_win_rate, sample
    from gprl.gpm import GeneralPreferenceModel
    from gprl.sources import resolve_sources

    raw = {"model": {"policy": args.policy, "reference": args.reference}, "gpm": {"path": args.gpm},
           "data": {"prompts": args.prompts}}
    spec = parse_config(raw)
    src = resolve_sources(spec)
    tok = AutoTokenizer.from_pretrained(src.policy)
    policy = AutoModelForCausalLM.from_pretrained(src.policy)
    reference = AutoModelForCausalLM.from_pretrained(src.reference)
    gpm = GeneralPreferenceModel.from_pretrained(src.gpm).eval()
    from gprl.data import load_prompts

    prompts = src.heldout_prompts or load_prompts(spec.data, tok)
    prompts = prompts[: args.num_prompts]
    rep, mine = sample(policy, tok, prompts, args.samples, args.max_new_tokens, 1.0, args.seed, text=src.text)
    _, ref = sample(reference, tok, prompts, args.samples, args.max_new_tokens, 1.0, args.seed + 1, text=src.text)
    result = {"prompts": len(prompts), "samples": len(rep), "gpm_win_rate": gpm_win_rate(gpm, tok, rep, mine, ref)}
    if src.oracle is not None:
        result["oracle_win_rate"] = src.oracle.win_rate(rep, mine, ref)
    print(json.dumps(result))
    return 0


def cmd_export(args) -> int:
    from gprl.export import export_policy

    print(export_policy(args.source, args.out, push_to=args.push_to, private=not args.public))
    return 0


def cmd_demo(args) -> int:
    from gprl.demo import demo

    demo(args.out, steps=args.steps)
    return 0


def cmd_report(args) -> int:
    from gprl.report import write_report

    print(write_report(args.run_dir) / "summary.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gprl", description="General Preference Reinforcement Learning")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run GPRL training from a config file (YAML, or a GPRLRun manifest)")
    t.add_argument("--config", "-c", help="run config (YAML); flags below override it")
    t.add_argument("--exit-code-on-stop", type=int, default=0, metavar="N",
                   help="exit status after SIGTERM/SIGINT stopped the run with a checkpoint before its last step")
    t.add_argument("--overwrite-output", dest="cfg:output.overwrite", action="store_const", const="true",
                   default=argparse.SUPPRESS, help="same as --output.overwrite true")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the validated config (defaults filled in), or the JSON schema")
    c.add_argument("--config", "-c")
    c.add_argument("--schema", action="store_true", help="print the JSON schema of the run config")
    add_config_flags(c)
    c.set_defaults(func=cmd_config)

    g = sub.add_parser("gpm", help="General Preference Model tools")
    gsub = g.add_subparsers(dest="gpm_command", required=True)
    gt = gsub.add_parser("train", help="train a GPM on preference pairs (JSONL or hf:<dataset>)")
    gt.add_argument("--data", required=True)
    gt.add_argument("--eval-data")
    gt.add_argument("--backbone", required=True, help="HF model folder or hub id (causal LM or encoder)")
    gt.add_argument("--out", required=True)
    gt.add_argument("--axes", type=int, default=3, help="k (1 = Bradley-Terry)")
    gt.add_argument("--beta", type=float, default=0.1)
    gt.add_argument("--margin", type=float, default=0.0)
    gt.add_argument("--epochs", type=int, default=2)
    gt.add_argument("--batch-size", type=int, default=32)
    gt.add_argument("--learning-rate", type=float, default=3e-4)
    gt.add_argument("--axis-label-weight", type=_non_negative, default=0.0,
                    help="weight of the per-aspect term on pairs with `axis_probs` (one per axis); 0 = off")
    gt.add_argument("--decorrelation", type=_non_negative, default=0.0,
                    help="weight of the cross-axis correlation penalty; 0 = off")
    gt.add_argument("--seed", type=int, default=0)
    gt.set_defaults(func=cmd_gpm_train)

    # Every side of the comparison is named: nothing defaults to the synthetic world (world:policy, world:gpm,
    # world:prompts ask for it, and then the world's oracle judges too).
    e = sub.add_parser("eval", help="win rate of a policy against a reference policy under a GPM (and a provider's judge)")
    e.add_argument("--policy", required=True, help="model folder, hub id or world:policy")
    e.add_argument("--reference", required=True, help="model folder, hub id or world:policy")
    e.add_argument("--gpm", required=True, help="GPM folder, hub id, world:gpm or world:bt")
    e.add_argument("--prompts", required=True, help="prompt file/folder, hf:<dataset> or world:prompts")
    e.add_argument("--num-prompts", type=int, default=128)
    e.add_argument("--samples", type=int, default=2)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the synthetic world end to end: GPRL vs GRPO with a Bradley-Terry model")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's budget)")
    d.set_defaults(func=cmd_demo)

    x = sub.add_parser("export", help="a trained policy as a folder transformers and vLLM load (LoRA merged)")
    x.add_argument("source", help="run folder (its newest valid checkpoint), checkpoint folder or policy folder")
    x.add_argument("--out", required=True, help="new folder to write")
    x.add_argument("--push-to", metavar="ORG/NAME", help="also upload to this hub repo (not in offline mode)")
    x.add_argument("--public", action="store_true", help="create the hub repo public (default: private)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="(re)write the plots and summary of a run folder")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    # Commands that parse their own flags (`gprl serve-gpm --help`): main() hands them their argv, see _OWN_PARSER.
    for name, (summary, _) in _OWN_PARSER.items():
        sub.add_parser(name, help=summary, add_help=False)

    return p


def _serve_gpm(argv: list[str]) -> int:
    from gprl.serving.gpm_server import serve_gpm_main

    return serve_gpm_main(argv)


def _serve_rollout(argv: list[str]) -> int:
    from gprl.serving.rollout_server import serve_rollout_main

    return serve_rollout_main(argv)


def _dev_cluster(argv: list[str]) -> int:
    from gprl.devcluster import main as dev_cluster_main

    return dev_cluster_main(argv)


def _crd(argv: list[str]) -> int:
    from gprl.crd import main as crd_main

    return crd_main(argv)


def _fetch(argv: list[str]) -> int:
    from gprl.fetch import fetch_main

    try:
        return fetch_main(argv)
    except ValueError as exc:
        print(f"gprl fetch: error: {exc}", file=sys.stderr)
        return 2


def _operator(argv: list[str]) -> int:
    try:
        from gprl_operator.__main__ import main as operator_main
    except ImportError as exc:
        print(f"gprl operator: the operator package is not installed ({exc}); "
              "install it with `pip install -e ./operator` (or `pip install gprl[operator]`)", file=sys.stderr)
        return 2
    return operator_main(argv)


# name -> (one-line help, entry point taking the remaining argv). Each parses its own flags, so `--help` is theirs.
_OWN_PARSER: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "serve-gpm": ("GPM scoring server (batched; embeddings and eigenvalues over HTTP)", _serve_gpm),
    "serve-rollout": ("vLLM rollout server with a weight-update endpoint", _serve_rollout),
    "dev-cluster": ("a local Kubernetes control plane with fake GPU nodes (kwok), for trying the operator",
                    _dev_cluster),
    "crd": ("print the GPRLRun CRD (or its reference page; --write regenerates the repository's copies)", _crd),
    "operator": ("run the GPRL operator (kopf) against the cluster KUBECONFIG points at", _operator),
    "fetch": ("download hf:// model and dataset sources into a cache folder (the init container of a run with hub "
              "sources)", _fetch),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _OWN_PARSER:
        return _OWN_PARSER[argv[0]][1](argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"gprl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as exc:
        print(f"gprl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the user named: unreadable, a folder, a full or read-only disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gprl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
