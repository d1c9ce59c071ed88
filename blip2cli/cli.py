"""The `blip2` command line. Commands parse, load, call one library function and render.

Heavy libraries (torch, transformers, faiss) are imported inside command bodies so `blip2 --help` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from blip2cli import __version__
from blip2cli.errors import UsageError

app = typer.Typer(
    name="blip2",
    help="BLIP-2 from the terminal: caption, ask, index, search, pretrain, finetune and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Score a model (or a predictions file) on the paper's benchmarks.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

def command(parent: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose UsageError becomes one red line and exit code 2 (also under CliRunner)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UsageError as exc:
                from blip2cli.render import error

                error(str(exc))
                raise typer.Exit(exc.exit_code) from None

        parent.command(name)(wrapper)
        return fn

    return register


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout (NDJSON).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blip2cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """BLIP-2 from the terminal."""


def _not_built(command: str) -> None:
    raise UsageError(f"`blip2 {command}` is not built yet in this version")


@command(app)
def env(json_out: JsonOpt = False) -> None:
    """Print versions of the project, Python, torch, transformers, faiss, CUDA, devices and Java."""
    from blip2cli import env as env_mod
    from blip2cli.render import emit, table

    info = env_mod.collect()
    if json_out:
        emit(info)
    else:
        table("blip2 env", ["what", "value"], [(k, v) for k, v in info.items()])


@command(app)
def caption() -> None:
    """Caption images (files, folders, globs)."""
    _not_built("caption")


@command(app)
def ask() -> None:
    """Ask a question about an image (zero-shot VQA), give an instruction, or chat."""
    _not_built("ask")


@command(app)
def index() -> None:
    """Embed images into a FAISS index for search."""
    _not_built("index")


@command(app)
def search() -> None:
    """Search an index by text or by image."""
    _not_built("search")


@command(app)
def pretrain() -> None:
    """Pretrain the Q-Former: stage 1 (ITC+ITM+ITG) or stage 2 (LM loss through a frozen LLM)."""
    _not_built("pretrain")


@command(app)
def finetune() -> None:
    """Fine-tune for captioning, retrieval or VQA."""
    _not_built("finetune")


def _eval_model(name: str, device: str, dtype: str) -> tuple[Any, Callable[[list[Path]], Any]]:
    """Load `--model` for a benchmark and a pixel loader at its resolution; an unusable image stops the run."""
    from blip2cli.data.images import load_image
    from blip2cli.data.transforms import eval_pixels
    from blip2cli.errors import InputError
    from blip2cli.model.load import load_model

    model = load_model(name, device, dtype)
    cfg = model.cfg

    def pixels(paths: list[Path]) -> Any:
        try:
            images = [load_image(p) for p in paths]
        except InputError as exc:
            raise UsageError(f"{exc} (a benchmark needs every image)") from None
        return eval_pixels(images, cfg.vision.image_size, cfg.image_mean, cfg.image_std)

    return model, pixels


def _eval_inputs(predictions: Path | None, model: str | None, images: Path | None) -> None:
    if (predictions is None) == (model is None):
        raise UsageError("give --predictions FILE to score a file, or --model NAME to run a model (one of them)")
    if model is not None and images is None:
        raise UsageError("--images: required with --model (the folder holding the benchmark's images)")


def _eval_options(options: Any, num_beams: int | None, max_new: int | None, min_new: int | None) -> Any:
    """The paper's decoding settings, with the flags the user gave on top."""
    import dataclasses

    given = {"num_beams": num_beams, "max_new_tokens": max_new, "min_new_tokens": min_new}
    return dataclasses.replace(options, **{k: v for k, v in given.items() if v is not None})


def _eval_report(record: dict[str, Any], json_out: bool, out: Path | None, predictions: Any = None) -> None:
    """Warnings on stderr; `scores.json` (+ `predictions.json`) in --out; one JSON line or tables."""
    from blip2cli.eval import write_outputs
    from blip2cli.render import emit, table, warn

    for message in record.get("warnings", []):
        warn(message)
    if out is not None:
        write_outputs(out, record, predictions)
    if json_out:
        emit(record)
        return
    counts = ", ".join(f"{k} {record[k]}" for k in ("n", "n_images", "n_texts") if k in record)
    table(f"blip2 eval {record['task']} ({counts})", ["metric", "score"], [(k, f"{v:.4f}") for k, v in record["metrics"].items()])
    for name, scores in record.get("domains", {}).items():
        table(f"NoCaps {name}", ["metric", "score"], [(k, f"{v:.4f}") for k, v in scores.items()])
    if record.get("question_types"):
        table("per question type", ["question type", "accuracy"], sorted(record["question_types"].items()))


ModelOpt_ = Annotated[str | None, typer.Option("--model", help="Run this model (hub id, HF folder, run folder, LAVIS .pth).")]
ImagesOpt_ = Annotated[Path | None, typer.Option("--images", help="Image root of the benchmark (with --model).")]
DeviceOpt_ = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt_ = Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16 (frozen towers).")]
BatchOpt_ = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
OutOpt_ = Annotated[
    Path | None,
    typer.Option("--out", help="Write scores.json and predictions.json here; a rerun resumes from predictions.jsonl."),
]
BeamsOpt_ = Annotated[int | None, typer.Option("--num-beams", help="Override the paper's beam count.")]
MaxNewOpt_ = Annotated[int | None, typer.Option("--max-new-tokens", help="Override the paper's maximum length.")]
MinNewOpt_ = Annotated[int | None, typer.Option("--min-new-tokens", help="Override the paper's minimum length.")]


@command(eval_app, "caption")
def eval_caption(
    annotations: Annotated[
        Path,
        typer.Option("--annotations", help="COCO caption file ({images, annotations}), NoCaps val "
                     "(nocaps_val_4500_captions.json) or a LAVIS Karpathy list."),
    ],
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help='Score this file ([{"image_id": int, "caption": str}]).')
    ] = None,
    dataset: Annotated[Literal["coco", "nocaps"], typer.Option("--dataset", help="Benchmark.")] = "coco",
    metrics: Annotated[
        str, typer.Option("--metrics", help="Comma-separated subset of Bleu,METEOR,ROUGE_L,CIDEr,SPICE.")
    ] = "Bleu,METEOR,ROUGE_L,CIDEr,SPICE",
    model: ModelOpt_ = None,
    images: ImagesOpt_ = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Caption prompt (the paper's COCO fine-tune prompt).")] = "a photo of",
    num_beams: BeamsOpt_ = None,
    max_new_tokens: MaxNewOpt_ = None,
    min_new_tokens: MinNewOpt_ = None,
    device: DeviceOpt_ = "auto",
    dtype: DtypeOpt_ = "auto",
    batch_size: BatchOpt_ = 16,
    out: OutOpt_ = None,
    json_out: JsonOpt = False,
) -> None:
    """COCO / NoCaps caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) as pycocoevalcap computes them.

    Scores are fractions (CIDEr 1.458 = 145.8). NoCaps also gets CIDEr and SPICE per domain.
    """
    from blip2cli.eval import caption as cap
    from blip2cli.eval import check_run
    from blip2cli.eval import datasets as ds

    _eval_inputs(predictions, model, images)
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    data = ds.read_caption_annotations(annotations)
    warnings = []
    if dataset == "nocaps" and not data.domains:
        warnings.append(f"{annotations}: images carry no `domain`, so there is no in/near/out-domain breakdown")
    if predictions is not None:
        preds = ds.read_caption_predictions(predictions)
        ds.check_same_ids(set(preds), set(data.refs), predictions, annotations, "image")
    else:
        paths = ds.resolve_images(images, [data.files[i] for i in data.refs])
        net, pixels = _eval_model(model, device, dtype)
        options = _eval_options(cap.paper_options(net, prompt), num_beams, max_new_tokens, min_new_tokens)
        if out is not None:
            check_run(out, {"task": "caption", "model": model, "annotations": str(annotations), "prompt": prompt,
                            "options": vars(options)})  # fmt: skip
        log = out / "predictions.jsonl" if out is not None else None
        preds = cap.generate_captions(net, dict(zip(data.refs, paths)), pixels, prompt, options, batch_size, log)
    scores = cap.score_captions(data.refs, preds, chosen, data.domains or None)
    record: dict[str, Any] = {"task": "caption", "n": scores.n, "metrics": scores.metrics}
    if scores.domains:
        record["domains"] = scores.domains
    if warnings + scores.warnings:
        record["warnings"] = warnings + scores.warnings
    rows = [{"image_id": i, "caption": preds[i]} for i in data.refs] if predictions is None else None
    _eval_report(record, json_out, out, rows)


@command(eval_app, "vqa")
def eval_vqa(
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="VQAv2 / OK-VQA annotation file (the ten answers).")
    ] = None,
    questions: Annotated[
        Path | None,
        typer.Option("--questions", help="VQAv2 / OK-VQA question file; for GQA the balanced test-dev questions."),
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help='Score this file ([{"question_id": int, "answer": str}]).')
    ] = None,
    dataset: Annotated[Literal["vqav2", "okvqa", "gqa"], typer.Option("--dataset", help="Benchmark.")] = "vqav2",
    normalize: Annotated[
        Literal["official", "lavis"],
        typer.Option("--normalize", help="Answer normalisation: the official VQA script's, or LAVIS's."),
    ] = "official",
    lemmatize: Annotated[
        bool, typer.Option("--lemmatize", help="OK-VQA: lemmatise the predictions file's answers (model runs always do).")
    ] = False,
    model: ModelOpt_ = None,
    images: ImagesOpt_ = None,
    template: Annotated[str, typer.Option("--template", help="Prompt template; {} is the question.")] = (
        "Question: {} Short answer:"
    ),
    num_beams: BeamsOpt_ = None,
    max_new_tokens: MaxNewOpt_ = None,
    min_new_tokens: MinNewOpt_ = None,
    device: DeviceOpt_ = "auto",
    dtype: DtypeOpt_ = "auto",
    batch_size: BatchOpt_ = 16,
    out: OutOpt_ = None,
    json_out: JsonOpt = False,
) -> None:
    """VQAv2 / OK-VQA accuracy (official VQA rules, 0-100) and GQA exact-match accuracy."""
    from blip2cli.eval import check_run
    from blip2cli.eval import datasets as ds
    from blip2cli.eval import vqa

    _eval_inputs(predictions, model, images)
    if dataset == "gqa":
        if (questions or annotations) is None:
            raise UsageError("--questions: required for GQA (testdev_balanced_questions.json)")
        items = ds.read_gqa(questions or annotations)
    else:
        items = ds.read_vqa(annotations, questions)
    warnings = []
    lemma = dataset == "okvqa" and (lemmatize or predictions is None)
    if lemma and not vqa.lemmatizer_available():
        lemma = False
        warnings.append("OK-VQA answers scored unlemmatised (LAVIS lemmatises them with spaCy): "
                        "pip install 'blip2cli[okvqa]' for the lemminflect approximation")  # fmt: skip
    if predictions is not None:
        preds = ds.read_vqa_predictions(predictions, dataset)
        ds.check_same_ids(set(preds), {q.question_id for q in items}, predictions, annotations or questions, "question")
        if lemma:
            preds = {qid: vqa.lemmatize(a) for qid, a in preds.items()}
    else:
        if dataset != "gqa" and questions is None:
            raise UsageError("--questions: required with --model (the question file that goes with --annotations)")
        from blip2cli.data.transforms import clean_question

        paths = ds.resolve_images(images, [q.images for q in items])
        net, pixels = _eval_model(model, device, dtype)
        options = _eval_options(vqa.paper_options(net), num_beams, max_new_tokens, min_new_tokens)
        if out is not None:
            check_run(out, {"task": f"vqa-{dataset}", "model": model, "questions": str(questions or annotations),
                            "template": template, "lemmatize": lemma, "options": vars(options)})  # fmt: skip
        jobs = [(q.question_id, p, template.format(clean_question(q.question))) for q, p in zip(items, paths)]
        log = out / "predictions.jsonl" if out is not None else None
        preds = vqa.answer_questions(net, jobs, pixels, options, batch_size, log, lemmatize_answers=lemma)
    if dataset == "gqa":
        scores = vqa.score_gqa({q.question_id: q.answers[0] for q in items}, preds)
    else:
        scores = vqa.score_vqa(
            {q.question_id: q.answers for q in items}, preds,
            {q.question_id: q.answer_type for q in items}, {q.question_id: q.question_type for q in items}, normalize,
        )  # fmt: skip
    record: dict[str, Any] = {"task": "vqa", "n": scores.n, "metrics": scores.metrics()}
    if scores.question_types:
        record["question_types"] = scores.question_types
    if warnings:
        record["warnings"] = warnings
    rows = None
    if predictions is None:
        id_key, answer_key = ("questionId", "prediction") if dataset == "gqa" else ("question_id", "answer")
        rows = [{id_key: q.question_id, answer_key: preds[q.question_id]} for q in items]
    _eval_report(record, json_out, out, rows)


@command(eval_app, "retrieval")
def eval_retrieval(
    annotations: Annotated[
        Path,
        typer.Option("--annotations", help="LAVIS test file (coco_karpathy_test.json, flickr30k_test.json) "
                     "or a COCO caption file."),
    ],
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help='Score saved rankings ({"i2t": [[...]], "t2i": [[...]]}).')
    ] = None,
    dataset: Annotated[Literal["coco", "flickr"], typer.Option("--dataset", help="Benchmark.")] = "coco",
    k_test: Annotated[int, typer.Option("--k-test", min=1, help="Candidates re-ranked with ITM per query.")] = 128,
    model: ModelOpt_ = None,
    images: ImagesOpt_ = None,
    device: DeviceOpt_ = "auto",
    dtype: DtypeOpt_ = "auto",
    batch_size: BatchOpt_ = 16,
    out: OutOpt_ = None,
    json_out: JsonOpt = False,
) -> None:
    """COCO 5k / Flickr30K 1k image-text retrieval recall (percent): ITC top-k, then ITM + ITC (spec §8)."""
    from blip2cli.eval import datasets as ds

    _eval_inputs(predictions, model, images)
    data = ds.read_retrieval_annotations(annotations)
    rankings = None
    if predictions is not None:
        i2t_ranked, t2i_ranked = ds.read_retrieval_predictions(predictions, len(data.images), len(data.texts))
    else:
        from blip2cli.data.transforms import clean_caption
        from blip2cli.eval import retrieval

        paths = ds.resolve_images(images, [[p] for p in data.images])
        net, pixels = _eval_model(model, device, dtype)
        net.cfg.qformer.max_text_len = 35  # spec §8: retrieval evaluation pads/truncates texts at 35 tokens
        texts = [clean_caption(t) for t in data.texts]
        i2t, t2i = retrieval.retrieval_scores(net, paths, texts, pixels, batch_size, k_test)
        keep = max(k_test, 10)  # beyond k every cell is -100 and ranks by index: the saved lists are lossless
        i2t_ranked, t2i_ranked = retrieval.top_rankings(i2t, keep), retrieval.top_rankings(t2i, keep)
        rankings = {"dataset": dataset, "k_test": k_test, "i2t": i2t_ranked, "t2i": t2i_ranked}
    from blip2cli.eval.retrieval import gt_ranks_from_rankings, recall_metrics

    metrics = recall_metrics(
        gt_ranks_from_rankings(i2t_ranked, data.img2txt), gt_ranks_from_rankings(t2i_ranked, [[i] for i in data.txt2img])
    )
    record = {"task": "retrieval", "n_images": len(data.images), "n_texts": len(data.texts), "metrics": metrics}
    _eval_report(record, json_out, out, rankings)


def main() -> None:
    """Console-script entry point."""
    app()
