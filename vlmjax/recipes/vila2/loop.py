"""The VILA^2 loop: round 0 trains VILA^0 on the original captions; round k >= 1 recaptions the caption pairs with
VILA^{k-1}, combines (original + recaption), retrains EVERY stage from scratch on the combined captions -> VILA^k,
and evaluates it. Stops early when a round's eval average gains less than `min_gain` over the round before.

    python -m vlmjax.recipes.vila2 loop --rounds N --config CONFIG --stages align pretrain sft \
        --caption-stages pretrain --captions pairs.jsonl --image-root IMGS --source sft=mix665k.json --out DIR

One code path for every scale: the CLI and the miniature (`vila2.miniature`) both call `run_loop` with a `LoopSpec`
(stage config file, stage order, which stages read the round's captions, the other stages' data, the first
stage's starting weights, per-stage overrides, the recaption sampling and the eval). Layout: DIR/state.json,
DIR/recaptions.r{k}.jsonl, DIR/combined.r{k}.jsonl (+ manifest), DIR/round{k}/{stage}/export (each round's own
stage folders: retraining never starts from another round's weights), DIR/round{k}/eval.json.

Specialists (`vila2.specialist`): the generalist retrains on `append`'s caption_qa file as round 0 of a run whose
captions are that file (`LoopSpec(caption_format="caption_qa")`): the same stages, steps and eval as every round.

Resume: state.json names each round's last finished step (recaption -> combine -> train -> eval); a rerun skips the
finished steps of the round it stopped in and finished rounds entirely, and every step resumes on its own (recaption
by id, `train_stage` from its checkpoint or export, the eval from its cached JSON).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from vlmjax.recipes.vila2.combine import combine, combined_path
from vlmjax.recipes.vila2.prompts import PROMPTS
from vlmjax.recipes.vila2.state import STEPS, RunState
from vlmjax.train import stages as stages_lib

ROUND_STEPS = ("recaption", "combine", "train", "eval")
CAPTION_FORMATS = ("caption", "caption_qa")
assert ROUND_STEPS == STEPS



def stage_overrides(items, stages=None) -> dict:
    """`--set STAGE:KEY=VALUE` items -> {stage: {dotted key: value}}, values parsed as the trainer parses
    `--config.KEY=VALUE` (`config_io.parse_value`); stages: the allowed stage names, when the caller knows them.
    A bad item raises ValueError naming it."""
    from vlmjax.train.config_io import parse_value

    over: dict = {}
    for item in items:
        stage, colon, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not (colon and stage and eq and key) or (stages is not None and stage not in stages):
            allowed = f" with STAGE in {tuple(stages)}" if stages is not None else ""
            raise ValueError(f"--set {item!r}: expected STAGE:KEY=VALUE{allowed}")
        over.setdefault(stage, {})[key] = parse_value(value)
    return over

@dataclasses.dataclass
class LoopSpec:
    """What one VILA^2 run trains and measures (every round the same, except the captions)."""
    config_file: str  # per-stage config file (`stages.stage_config`)
    stages: tuple[str, ...]  # in order; stage i > 0 starts from stage i-1's export
    captions: str  # the caption-pair source that is recaptioned (caption format)
    image_root: str
    caption_stages: tuple[str, ...]  # the stages trained on the round's captions
    sources: dict = dataclasses.field(default_factory=dict)  # {stage: path or {"path", "image_root"}}: other stages
    first: dict = dataclasses.field(default_factory=dict)  # train_stage kwargs of stage 0 (model_path, tokenizer, load_params)
    over: dict = dataclasses.field(default_factory=dict)  # {stage or "all": {dotted key: value}}
    steps_scale: float = 1.0
    mode: str = "concat"  # combine mode (concat: the paper's; replace: its ablation)
    generation: object = None  # GenerationConfig of the recaptions (eos ids filled from the model when empty)
    batch_size: int = 16  # recaption batch (static batching; generation.slots > 0 = continuous batching)
    eval_fn: Callable | None = None  # eval_fn(model_dir, out_json) -> {metric: value}
    average: tuple[str, ...] = ("accuracy",)  # metrics averaged for the min-gain rule
    recaption_stage: str | None = None  # whose export recaptions (default: the last stage's, VILA^k itself)
    limit: int | None = None  # only the first N caption records (smoke runs)
    caption_format: str = "caption"  # "caption_qa": the captions carry specialist QA turns (`vila2.specialist`)
    caption_source: str | None = None  # in a mixture with several caption sources: the `name` of the one replaced
    chat_template: str | None = None  # caption_qa turns' template (default: the last stage's, the model's chat)
    prompts: tuple[str, ...] | None = PROMPTS  # recaption prompts (one per image, seeded by (round, id)); None: plain

    def __post_init__(self):
        if self.caption_format not in CAPTION_FORMATS:
            raise ValueError(f"caption_format must be one of {CAPTION_FORMATS}, got {self.caption_format!r}")
        unknown = [s for s in self.caption_stages if s not in self.stages]
        if unknown or not self.caption_stages:
            raise ValueError(f"caption_stages {list(self.caption_stages)} must be among the stages {list(self.stages)}")
        missing = [s for s in self.stages if s not in self.caption_stages and s not in self.sources]
        if missing:
            raise ValueError(f"no data source for stage(s) {missing}: give sources={{stage: path}}")
        if self.recaption_stage is not None and self.recaption_stage not in self.stages:
            raise ValueError(f"recaption_stage {self.recaption_stage!r} is not one of {list(self.stages)}")


def model_name(round_: int) -> str:
    return f"vila{int(round_)}"


def round_dir(out, round_: int) -> Path:
    return Path(out) / f"round{int(round_)}"


def done(entry: dict | None, step: str) -> bool:
    """Has `step` finished in the round whose state entry is `entry` (the steps run in ROUND_STEPS order)?"""
    last = (entry or {}).get("last_step")
    return last is not None and ROUND_STEPS.index(last) >= ROUND_STEPS.index(step)


def train_round(spec: LoopSpec, out, round_: int, captions: str) -> dict:
    """Every stage of round `round_` from scratch (stage 0 from spec.first), the caption stages on `captions`.
    -> {stage: export folder}."""
    exports, prev = {}, None
    for i, stage in enumerate(spec.stages):
        kw = dict(spec.first) if i == 0 else {"model_path": str(prev)}
        over = {**spec.over.get("all", {}), **spec.over.get(stage, {})}
        data = stage_data(spec, stage, captions)
        if "data.sources" in data:  # a mixture: the sources are set whole
            over = {"data.sources": data.pop("data.sources"), **over}
        prev = stages_lib.train_stage(stage, round_dir(out, round_) / stage, config_file=spec.config_file,
                                      steps_scale=spec.steps_scale, over=over, quiet=True, **data, **kw)
        exports[stage] = str(prev)
    return exports


def stage_data(spec: LoopSpec, stage: str, captions: str) -> dict:
    """train_stage's data arguments for `stage`: a caption stage reads the round's captions (in a mixture, its
    caption-format source does, or with several the one named spec.caption_source; the other sources stay as
    configured: VILA's pretrain = MMC4 documents + COYO pairs), in spec.caption_format (caption_qa: with the chat
    template of the turns); another stage reads spec.sources[stage] (a path, or {"path", "image_root"}), its image
    root defaulting to its config's."""
    if stage in spec.caption_stages:
        srcs = stages_lib.stage_config(spec.config_file, stage).data.sources
        if len(srcs) == 1 and spec.caption_format == "caption":
            return {"source": str(captions), "image_root": spec.image_root}
        targets = [i for i, s in enumerate(srcs) if s["format"] == "caption"]
        if spec.caption_source is not None:
            targets = [i for i in targets if srcs[i].get("name") == spec.caption_source]
        if len(targets) != 1:
            named = "" if spec.caption_source is None else f" named {spec.caption_source!r}"
            raise ValueError(f"{spec.config_file}:{stage} has {len(targets)} caption-format sources{named} for the "
                             f"round's captions (need one; caption_source names it among several): "
                             f"{[(s['format'], s.get('name')) for s in srcs]}")
        new = {**dict(srcs[targets[0]]), "path": str(captions), "image_root": spec.image_root,
               "format": spec.caption_format}
        if spec.caption_format == "caption_qa":
            new["format_options"] = {**dict(new.get("format_options") or {}), "chat_template": chat_template(spec)}
        mixed = tuple(new if i == targets[0] else dict(s) for i, s in enumerate(srcs))
        return {"data.sources": mixed, "image_root": mixed[0].get("image_root") or spec.image_root}
    src = spec.sources[stage]
    src = {"path": src} if isinstance(src, (str, Path)) else dict(src)
    root = src.get("image_root") or stages_lib.stage_config(spec.config_file, stage).data.sources[0]["image_root"]
    return {"source": str(src["path"]), "image_root": str(root)}


def chat_template(spec: LoopSpec) -> str:
    """The template of caption_qa turns: spec.chat_template, else the last stage's text template (the chat format
    the model is SFT'd in, e.g. vicuna_v1; "auto" = the tokenizer's)."""
    if spec.chat_template is not None:
        return spec.chat_template
    template = stages_lib.stage_config(spec.config_file, spec.stages[-1]).data.text.template
    if template == "plain" or str(template).startswith("plain+"):
        raise ValueError(f"{spec.config_file}:{spec.stages[-1]} trains the {template!r} template, not a chat: set "
                         "LoopSpec.chat_template for the caption_qa turns")
    return template


def recaption_round(spec: LoopSpec, out, round_: int, model_dir: str) -> dict:
    """Round `round_`'s recaptions of spec.captions by the model in `model_dir` (VILA^{round-1})."""
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate import GenerationConfig, default_eos_ids, load_model
    from vlmjax.recipes.vila2.recaption import recaption

    model, cfg, tok = load_model(model_dir)
    gen = spec.generation or GenerationConfig(max_new_tokens=128)
    if not gen.eos_token_ids:
        gen = dataclasses.replace(gen, eos_token_ids=default_eos_ids(tok, cfg))
    gen = dataclasses.replace(gen, seed=gen.seed * 1000 + int(round_))  # a fresh sampling stream per round
    source = SourceSpec(format="caption", path=str(spec.captions), image_root=spec.image_root)
    return recaption(model, tok, source, out, round_, model_name(round_ - 1), gen, batch_size=spec.batch_size,
                     shard_index=0, shard_count=1, limit=spec.limit, progress=False, prompts=spec.prompts)


def average(metrics: dict, keys) -> float:
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise KeyError(f"eval metrics {sorted(metrics)} lack {missing} (LoopSpec.average)")
    return float(sum(float(metrics[k]) for k in keys) / len(keys))


def run_round(spec: LoopSpec, out, round_: int, on_step: Callable | None = None) -> dict:
    """One round, resumed from state.json's last finished step. -> the round's state entry."""
    from vlmjax.data.pipeline import SourceSpec

    out = Path(out)
    state = RunState(out)
    entry = state.entry(round_)
    if done(entry, "eval"):
        return entry
    model = None if round_ == 0 else model_name(round_ - 1)
    state.start(round_, model)

    def timed(step, fn):
        t0, cpu0 = time.time(), time.process_time()
        info = fn()
        return info, {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}

    captions = str(spec.captions)
    if round_ > 0:
        if not done(state.entry(round_), "recaption"):
            prev = RunState(out).entry(round_ - 1)
            teacher = prev["train"]["exports"][spec.recaption_stage or spec.stages[-1]]
            stats, t = timed("recaption", lambda: recaption_round(spec, out, round_, teacher))
            RunState(out).finish(round_, "recaption", model_dir=teacher, **t,
                                 **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))})
            _hook(on_step, round_, "recaption")
        if not done(RunState(out).entry(round_), "combine"):
            src = SourceSpec(format="caption", path=captions, image_root=spec.image_root)
            combine(src, out, round_, mode=spec.mode, limit=spec.limit)
            _hook(on_step, round_, "combine")
        captions = combined_path(out, round_)
    elif spec.limit is not None:
        captions = _first_records(captions, out / "captions.r0.jsonl", spec.limit)
    if not done(RunState(out).entry(round_), "train"):
        exports, t = timed("train", lambda: train_round(spec, out, round_, captions))
        logs = {s: json.loads((Path(e).parent / "stage.json").read_text()) for s, e in exports.items()}
        RunState(out).finish(round_, "train", captions=captions, exports=exports, **t,
                             stages={s: {k: v for k, v in log.items() if k != "losses"} for s, log in logs.items()})
        _hook(on_step, round_, "train")
    if not done(RunState(out).entry(round_), "eval"):
        model_dir = RunState(out).entry(round_)["train"]["exports"][spec.stages[-1]]
        metrics, t = timed("eval", lambda: spec.eval_fn(model_dir, round_dir(out, round_) / "eval.json")
                           if spec.eval_fn else {})
        avg = average(metrics, spec.average) if spec.eval_fn else None
        RunState(out).finish(round_, "eval", metrics=metrics, average=avg, **t)
        _hook(on_step, round_, "eval")
    return RunState(out).entry(round_)


def _hook(on_step, round_, step):
    if on_step is not None:
        on_step(round_, step)


def _first_records(path: str, out: Path, n: int) -> str:
    """The first n records of a JSONL caption file (round 0 of a `limit`ed run trains on what is recaptioned)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(out)


def round_seconds(entry: dict) -> dict:
    """Wall and CPU seconds of a round, summed over its steps (combine is bookkeeping: not timed)."""
    steps = [entry[s] for s in ROUND_STEPS if isinstance(entry.get(s), dict) and "seconds" in entry[s]]
    return {"seconds": round(sum(s["seconds"] for s in steps), 1),
            "cpu_seconds": round(sum(s.get("cpu_seconds", 0.0) for s in steps), 1)}


def run_loop(spec: LoopSpec, out, rounds: int, *, min_gain: float | None = None,
             on_step: Callable | None = None, quiet: bool = False) -> dict:
    """Rounds 0..`rounds` (VILA^0 .. VILA^rounds), resumed from state.json; stops after round k when its eval average
    gains less than `min_gain` over round k-1's. -> {"rounds": {k: state entry + seconds}, "stopped": reason or None,
    "last": the last round run}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, stopped, prev_avg, k = {}, None, None, 0
    for k in range(rounds + 1):
        entry = run_round(spec, out, k, on_step=on_step)
        entry = {**entry, **round_seconds(entry)}
        results[k] = entry
        avg = (entry.get("eval") or {}).get("average")
        if not quiet:
            print(f"  round {k}: eval average {avg if avg is None else round(avg, 4)} "
                  f"({entry['seconds']:.0f} s, {entry['cpu_seconds']:.0f} CPU s)", flush=True)
        if min_gain is not None and k > 0 and avg is not None and prev_avg is not None and avg - prev_avg < min_gain:
            stopped = f"round {k} gained {avg - prev_avg:+.4f} < min_gain {min_gain:g}: stopped"
            if not quiet:
                print(f"  {stopped}", flush=True)
            break
        prev_avg = avg
    summary = {"rounds": {str(r): e for r, e in results.items()}, "stopped": stopped, "last": k}
    tmp = out / "loop.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "loop.json")
    return summary


def finished(out) -> dict:
    """run_loop's summary of the rounds of `out` that have finished (eval done), read from state.json; nothing runs
    (a report of a run still going or stopped)."""
    state = RunState(out)
    rounds = {}
    for k in sorted(state.data["rounds"], key=int):
        entry = state.entry(int(k))
        if not done(entry, "eval"):
            break
        rounds[k] = {**entry, **round_seconds(entry)}
    return {"rounds": rounds, "stopped": None, "last": max(map(int, rounds), default=None)}

