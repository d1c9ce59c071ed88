"""The `blip2` command line. Commands parse, load, call one library function and render.

Heavy libraries (torch, transformers, faiss) are imported inside command bodies so `blip2 --help` stays fast.
"""

from __future__ import annotations

import functools
import warnings
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
                with warnings.catch_warnings():
                    warnings.showwarning = _one_line_warning
                    return fn(*args, **kwargs)
            except UsageError as exc:
                from blip2cli.render import error

                error(str(exc))
                raise typer.Exit(exc.exit_code) from None

        parent.command(name)(wrapper)
        return fn

    return register


def _one_line_warning(message: Warning | str, category: type, filename: str, lineno: int, *args: Any) -> None:
    """Library warnings reach people as one yellow line on stderr, without file and line numbers."""
    from blip2cli.render import warn

    warn(str(message))


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


GenModelOpt = Annotated[
    str, typer.Option("--model", help="Hub id, Hugging Face BLIP-2 folder, blip2 run folder or LAVIS .pth.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16 (the frozen towers).")]
QuantizeOpt = Annotated[str, typer.Option("--quantize", help="none, int8 or int4: the frozen ViT's and LLM's weights "
                                          "(int8 on CPU needs torchao; CUDA int8/int4 bitsandbytes).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
BeamsOpt = Annotated[
    int | None, typer.Option("--num-beams", min=1, help="Beam-search width (1 = greedy); default: the paper's.")
]
MaxNewOpt = Annotated[
    int | None, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate; default: the paper's.")
]
MinNewOpt = Annotated[
    int | None, typer.Option("--min-new-tokens", min=0, help="Fewest tokens before the end token; default: paper's.")
]
GenSampleOpt = Annotated[
    bool, typer.Option("--sample", help="Nucleus sampling (top-p 0.9, temperature 1) instead of beam search.")
]
GenTopPOpt = Annotated[float | None, typer.Option("--top-p", help="Sampling nucleus mass (implies --sample).")]
GenTemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", help="Sampling temperature (implies --sample).")
]
GenSeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed the sampler, for repeatable samples.")]


@command(app)
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursed) or globs (quote them).")],
    model: GenModelOpt = "Salesforce/blip2-opt-2.7b",
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help='Text the caption continues, e.g. "a photo of" (default: none, or the '
                     "prompt a fine-tuned run was trained with)."),
    ] = None,
    keep_prompt: Annotated[
        bool, typer.Option("--keep-prompt", help='Print the prompt in front of the caption ("a photo of a dog").')
    ] = False,
    num_beams: BeamsOpt = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    sample: GenSampleOpt = False,
    top_p: GenTopPOpt = None,
    temperature: GenTemperatureOpt = None,
    num_captions: Annotated[
        int, typer.Option("--num-captions", min=1, help='Captions per image (JSON lines get "captions": [...]).')
    ] = 1,
    seed: GenSeedOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Append each record to this JSONL file as it comes; a rerun skips the images "
                     "it already captioned."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Caption images: files, folders (recursed) and globs.

    Decoding follows the BLIP-2 paper: beam search, 5 beams, at most 30 new tokens and at least min_length 8
    counting the prompt with BOS (7 new tokens without a prompt, 4 after "a photo of" on OPT; Flan-T5 7). Stage-1 models
    caption with the Q-Former: 3 beams, 29 new tokens, at least 9. --sample, --top-p or --temperature switch to
    nucleus sampling (one beam, so not with --num-beams); each flag overrides its default.

    With --prompt the model continues the prompt and the caption is the continuation only, as LAVIS returns it and
    `blip2 eval caption` scores it ("a dog on a beach" for --prompt "a photo of"); --keep-prompt prints both.

    Exit 1 when some images could not be read (each is reported on one line, the rest are captioned).
    """
    from blip2cli import caption as job
    from blip2cli.config import GenerationOptions
    from blip2cli.data.inputs import expand_inputs
    from blip2cli.model import presets
    from blip2cli.render import console, emit, error, progress, table, warn

    paths = expand_inputs(inputs)
    if out is not None and out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file such as {out / 'captions.jsonl'}")
    decoding = job.Decoding(num_beams, max_new_tokens, min_new_tokens, sample, top_p, temperature, num_captions)
    decoding.apply(GenerationOptions())  # contradictory flags fail now, not after loading the model
    done = job.read_done(out, lambda r: job.image_key(r["image"]) if "image" in r else None) if out else set()
    todo = [p for p in paths if job.image_key(p) not in done]
    if out is not None and len(todo) < len(paths):
        console.print(f"{len(paths) - len(todo)} of {len(paths)} images already captioned in {out}: skipped")
    if not todo:
        return

    from blip2cli.model.load import load_model

    net = load_model(model, device, dtype, quantize=quantize)
    text = net.cfg.llm.prompt if prompt is None else prompt
    if net.llm is None and text:
        warn("--prompt is ignored: this model has no language model and captions with the Q-Former")
        text = ""
    options = decoding.apply(presets.caption_options(net, text))
    _seed(seed)
    log = job.JsonlLog(out) if out is not None else None
    rows, failed = [], 0
    try:
        results = job.run_jobs(net, [job.Job(p, text) for p in todo], options, batch_size)
        for item, texts in progress(results, len(todo), "captioning"):
            record = job.caption_record(str(item.image), texts, text, keep_prompt)
            if log is not None:
                log.write(record)
            failed += "error" in record
            if json_out:
                emit(record)
            elif "error" in record:
                error(record["error"])
            else:
                rows.append((record["image"], "\n".join(record.get("captions", [record["caption"]]))))
    except KeyboardInterrupt:
        _interrupted(log)
    finally:
        if log is not None:
            log.close()
        if rows:
            table(f"captions ({job.describe(options)})", ["image", "caption"], rows)
    _failures(failed, len(todo), "images")


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _interrupted(log: Any) -> None:
    from blip2cli.render import error

    saved = f"; {log.written} records are saved in {log.path}, rerun the same command to go on" if log else ""
    error(f"interrupted{saved}")
    raise typer.Exit(130)


def _failures(failed: int, total: int, what: str) -> None:
    if failed:
        from blip2cli.render import warn

        warn(f"{failed} of {total} {what} failed")
        raise typer.Exit(1)


@command(app)
def ask(
    image: Annotated[str | None, typer.Argument(help="The image file.", show_default=False)] = None,
    question: Annotated[
        str | None, typer.Argument(help="The question (an instruction with --instruct).", show_default=False)
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help='Prompt template, {} is the question. Default "Question: {} Short answer:"'
                     ', with --chat "Question: {} Answer:".'),
    ] = None,
    instruct: Annotated[
        bool, typer.Option("--instruct", help="Send the text as typed, as a free instruction (no template).")
    ] = False,
    chat: Annotated[
        bool, typer.Option("--chat", help="Conversation: then read questions from stdin, one a line, until an empty "
                           "line, exit or EOF; each turn sees the earlier ones."),
    ] = False,
    batch: Annotated[
        Path | None,
        typer.Option("--batch", help='JSONL file of {"image", "question"} lines (relative images are found from the '
                     "file's folder): one answer line each."),
    ] = None,
    model: GenModelOpt = "Salesforce/blip2-opt-2.7b",
    num_beams: BeamsOpt = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    sample: GenSampleOpt = False,
    top_p: GenTopPOpt = None,
    temperature: GenTemperatureOpt = None,
    seed: GenSeedOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Append each record to this JSONL file; with --batch a rerun skips the questions "
                     "it already answered."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Ask about an image: a question (zero-shot VQA), an instruction (--instruct), a conversation (--chat), or a
    file of questions (--batch).

    Questions are cleaned as BLIP-2 was trained (lower case, punctuation dropped) and put in the template.
    Decoding follows the paper's zero-shot VQA (as LAVIS runs it): 5 beams, at most 10 new tokens, length penalty -1 for
    Flan-T5 and 0 for OPT. --instruct uses 5 beams and up to 30 new tokens. --sample, --top-p or --temperature
    switch to nucleus sampling; each flag overrides its default. The answer never repeats the prompt.

    Exit 1 when an image could not be read or a --batch line was unusable (each reported, the rest answered).
    """
    from blip2cli import caption as job
    from blip2cli.config import GenerationOptions
    from blip2cli.model import presets

    if instruct and template is not None:
        raise UsageError("--template: not used with --instruct (the text is sent as typed)")
    tmpl = template if template is not None else (job.CHAT_TEMPLATE if chat else job.VQA_TEMPLATE)
    try:
        tmpl.format("?")
    except (IndexError, KeyError, ValueError):
        raise UsageError(f"--template: {tmpl!r} must hold one {{}} for the question (and no other braces)") from None
    if "{}" not in tmpl:
        raise UsageError(f"--template: {tmpl!r} has no {{}} for the question")
    if batch is not None and (image is not None or chat):
        raise UsageError("--batch: give either IMAGE QUESTION, --chat or --batch FILE, not several")
    if batch is None:
        if image is None:
            raise UsageError("IMAGE: missing (blip2 ask IMAGE QUESTION, or --batch FILE.jsonl)")
        if question is None and not chat:
            raise UsageError("QUESTION: missing (or --chat to ask from standard input)")
        if not Path(image).exists():
            raise UsageError(f"no such file: {image}")
        if Path(image).is_dir():
            raise UsageError(f"{image} is a folder: blip2 ask takes one image (or --batch FILE.jsonl)")
    if out is not None and out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file such as {out / 'answers.jsonl'}")
    decoding = job.Decoding(num_beams, max_new_tokens, min_new_tokens, sample, top_p, temperature)
    decoding.apply(GenerationOptions())  # contradictory flags fail now, not after loading the model
    items = job.read_batch(batch) if batch is not None else None

    from blip2cli.model.load import load_model

    net = load_model(model, device, dtype, quantize=quantize)
    if net.llm is None:
        raise UsageError(f"{model}: a stage-1 model (Q-Former only) has no language model to answer with; "
                         "use blip2 caption, or a stage-2 model")  # fmt: skip
    options = decoding.apply(presets.instruct_options(net) if instruct else presets.vqa_options(net))
    _seed(seed)
    log = job.JsonlLog(out) if out is not None else None
    try:
        if items is not None:
            failed, total = _ask_batch(net, items, tmpl, instruct, options, batch_size, log, json_out, resume=True)
        elif chat:
            failed, total = _ask_chat(net, image, question, tmpl, instruct, options, log, json_out)
        else:
            failed, total = _ask_batch(net, [job.BatchQuestion(0, image, question)], tmpl, instruct, options, 1,
                                       log, json_out)  # fmt: skip
    except KeyboardInterrupt:
        _interrupted(log)
    finally:
        if log is not None:
            log.close()
    _failures(failed, total, "questions")


def _ask_batch(net: Any, items: list[Any], template: str, instruct: bool, options: Any, batch_size: int,
               log: Any, json_out: bool, resume: bool = False) -> tuple[int, int]:  # fmt: skip
    """Answer (image, question) items in batches, skipping those already in --out; returns (failed, total)."""
    from blip2cli import caption as job
    from blip2cli.render import console, emit, error, progress, table

    def key(record: dict[str, Any]) -> tuple[str, str] | None:
        return (job.image_key(record["image"]), record["question"]) if "question" in record else None

    done = job.read_done(log.path, key) if log is not None and resume else set()
    todo = [i for i in items if isinstance(i, dict) or key(vars(i)) not in done]
    if len(todo) < len(items):
        console.print(f"{len(items) - len(todo)} questions already answered in {log.path}: skipped")
    asked = [i for i in todo if not isinstance(i, dict)]
    jobs = [job.Job(Path(i.image), job.question_prompt(i.question, template, instruct)) for i in asked]
    results = iter(progress(job.run_jobs(net, jobs, options, batch_size), len(jobs), "answering"))
    records = []
    for item in todo:  # file order: unusable lines where they stand, answers as the model produces them
        if isinstance(item, dict):
            record = item
        else:
            texts = next(results)[1]
            record = {"image": item.image, "question": item.question}
            record.update({"error": texts} if isinstance(texts, str) else {"answer": texts[0]})
        records.append(record)
        if log is not None:
            log.write(record)
        if json_out:
            emit(record)
        elif "error" in record:
            error(record["error"])
    next(results, None)  # let the progress bar finish
    answered = [r for r in records if "answer" in r]
    if not json_out and len(items) == 1 and answered:
        console.print(answered[0]["answer"], markup=False, highlight=False)
    elif not json_out and answered:
        table("answers", ["image", "question", "answer"], [(r["image"], r["question"], r["answer"]) for r in answered])
    return sum("error" in r for r in records), len(todo)


def _ask_chat(net: Any, image: str, question: str | None, template: str, instruct: bool, options: Any,
              log: Any, json_out: bool) -> tuple[int, int]:  # fmt: skip
    """A conversation: the first question from the command line (if any), then one per stdin line."""
    import sys

    from blip2cli import caption as job
    from blip2cli.render import console, emit, error

    pixels = job.image_pixels(Path(image), net.cfg.vision.image_size, net.cfg.image_mean, net.cfg.image_std)
    if isinstance(pixels, str):
        record = {"image": image, "question": question or "", "error": pixels}
        if log is not None:
            log.write(record)
        emit(record) if json_out else error(pixels)
        return 1, 1
    talk = job.Chat(net, pixels, template, options, instruct)
    interactive = sys.stdin.isatty()
    turns = 0
    while True:
        if question is None:
            if interactive:
                console.print("[bold]question>[/] ", end="")
            line = sys.stdin.readline()
            question = line.strip()
            if not question or question.lower() in ("exit", "quit"):
                break
        answer = talk.ask(question)
        record = {"image": image, "question": question, "answer": answer}
        if log is not None:
            log.write(record)
        if json_out:
            emit(record)
        else:
            console.print(f"[bold]answer>[/] {answer}" if interactive else answer, highlight=False)
        turns += 1
        question = None
    return 0, turns


@command(app)
def index(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursed) or quoted globs.")],
    index_dir: Annotated[Path, typer.Option("--index", help="Index folder: created, or updated incrementally.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Embedding model (default: the index's own, else Salesforce/blip2-itm-vit-g)."),
    ] = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    index_key: Annotated[
        str | None,
        typer.Option("--index-key", help="FAISS index: auto (by size), or a faiss factory string with an optional "
                     "queries: or pooled: prefix, e.g. pooled:IVF1024,PQ32x4fs. Kept for later runs."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads decoding images ahead of the model.")] = 4,
    export: Annotated[
        Path | None, typer.Option("--export", help="Also write the clip-retrieval folder layout (img_emb/ ...) here.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Embed images (32 ITC query vectors each) into a FAISS index; a rerun updates it incrementally.

    Only new or changed files are embedded (by size, mtime, then sha256); identical files are embedded once;
    deleted files are dropped. Interrupting is safe: rerun to finish. Under `accelerate launch`, each process
    embeds a share of the files and rank 0 merges them. Exit code 1 if some images could not be read."""
    from blip2cli.data.inputs import expand_inputs
    from blip2cli.render import emit, progress, table, warn
    from blip2cli.retrieval.indexer import index_images, load_encoder

    paths = expand_inputs(inputs)
    report = index_images(
        paths, index_dir, lambda name: load_encoder(name, device, dtype, batch_size, quantize), model=model,
        batch_size=batch_size, workers=workers, index_key=index_key, progress=progress, export=export,
    )
    if report is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    for failure in report.failed:
        warn(f"{failure.path}: {failure.error}")
    record = report.record()
    if json_out:
        emit(record)
    else:
        counts = [(k, record[k]) for k in ("added", "updated", "removed", "unchanged")]
        rows = [*counts, ("failed", len(report.failed)), ("total", report.total)]
        table(f"blip2 index {index_dir}", ["", "files"], rows)
    if report.failed:
        raise typer.Exit(1)


@command(app)
def search(
    index_dir: Annotated[Path, typer.Option("--index", help="Index folder written by `blip2 index`.")],
    query: Annotated[str | None, typer.Argument(help="What to look for, in words (or use --image).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    rerank: Annotated[
        bool, typer.Option("--rerank/--no-rerank", help="Re-rank text results with the ITM head (slow on CPU).")
    ] = True,
    rerank_k: Annotated[int, typer.Option("--rerank-k", min=1, help="Candidates re-ranked with ITM.")] = 128,
    image: Annotated[Path | None, typer.Option("--image", help="Find images similar to this one.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a page of thumbnails and scores.")] = None,
    dedup: Annotated[
        float | None, typer.Option("--dedup", help="Drop near-duplicates (pooled cosine >= this, e.g. 0.94).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model for the query (default: the one the index was built with).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per ITM forward pass.")] = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    json_out: JsonOpt = False,
) -> None:
    """Search an index by text (ITC max over the 32 query vectors, then ITM re-rank) or by image.

    score = ITM logit + ITC cosine when re-ranked, else the ITC cosine. For --image, score is the image-to-image
    similarity: the mean over query vectors of the best-matching cosine, averaged both ways."""
    from blip2cli.render import emit, table, warn
    from blip2cli.retrieval.export import write_html
    from blip2cli.retrieval.indexer import load_encoder
    from blip2cli.retrieval.rank import search_index

    if (query is None) == (image is None):
        raise UsageError("give a QUERY text or --image PATH (exactly one of them)")
    result = search_index(
        index_dir, lambda name: load_encoder(name, device, dtype, batch_size, quantize), query, image, model=model, k=k,
        rerank_k=rerank_k if rerank and image is None else None, dedup_threshold=dedup,
    )
    if result.stale_index:
        warn(f"the index in {index_dir} is older than its store (interrupted run?): rerun `blip2 index` to refresh")
    if result.skipped:
        warn(f"skipped {len(result.skipped)} indexed files that no longer exist (rerun `blip2 index` to drop them)")
    if html is not None:
        write_html(html, result.hits, query, image)
    if json_out:
        for hit in result.hits:
            emit(hit.record())
    else:
        rows = [(h.rank, f"{h.score:.4f}", f"{h.itc:.4f}", "" if h.itm is None else f"{h.itm:.3f}", h.path)
                for h in result.hits]
        table(f"blip2 search: {query if image is None else image}", ["rank", "score", "itc", "itm", "path"], rows)


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", dir_okay=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe value: key.sub=value (a YAML scalar; "
                 "repeatable), e.g. --set train.lr=1e-5 --set data.train[0].path=my.json."),
]
TrainOutOpt = Annotated[
    Path | None, typer.Option("--out", help="Output folder (step-N/, final/, metrics.jsonl). Default: runs/RECIPE.")
]
ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", metavar="auto|DIR", help="'auto': continue from the newest step folder in --out "
                 "(or start fresh); or a step folder."),
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option("--max-steps", min=1, help="Stop after this optimizer step; the LR schedule still spans "
                 "train.max_steps, so --resume continues it exactly."),
]


def _train(recipe: Path, sets: list[str], out: Path | None, resume: str | None, max_steps: int | None,
           json_out: bool, stage: int | None) -> None:
    """Shared body of pretrain and finetune: load and check the recipe, train, report."""
    from blip2cli.config import load_recipe
    from blip2cli.render import emit

    loaded = load_recipe(recipe, [*sets, f"stage={stage}"] if stage else sets)
    if stage is None and loaded.task == "pretrain":
        raise UsageError(f"{recipe}: a pretraining recipe (task: pretrain): run it with `blip2 pretrain --stage "
                         f"{loaded.stage}`")
    out = out or Path("runs") / recipe.stem
    from blip2cli.train.loop import run

    step, main = run(loaded, out, resume, max_steps, emit if json_out else None)
    if json_out and main:
        emit({"out": str(out), "step": step})


@command(app)
def pretrain(
    recipe: RecipeArg,
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: ITC + ITM + ITG on the Q-Former; "
                                       "2: LM loss through the frozen LLM.")],
    sets: SetOpt = None,
    out: TrainOutOpt = None,
    resume: ResumeOpt = None,
    max_steps: MaxStepsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pretrain the Q-Former: stage 1 (ITC + ITM + ITG) or stage 2 (LM loss through a frozen LLM).

    Runs alone (one CPU or GPU) or under `accelerate launch` / `torchrun` (one process per GPU). Writes
    OUT/step-N/ every train.save_every steps (each loadable with --model), OUT/final/, metrics.jsonl and
    TensorBoard logs. --json prints one line per logging step and a last line {"out", "step"}.
    """
    _train(recipe, sets or [], out, resume, max_steps, json_out, stage)


@command(app)
def finetune(
    recipe: RecipeArg,
    sets: SetOpt = None,
    out: TrainOutOpt = None,
    resume: ResumeOpt = None,
    max_steps: MaxStepsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune for captioning, retrieval or VQA (the recipe's `task`), usually from a pretrained `model.init`.

    Same outputs and options as `blip2 pretrain`.
    """
    _train(recipe, sets or [], out, resume, max_steps, json_out, None)


def _eval_model(name: str, device: str, dtype: str, quantize: str = "none") -> tuple[Any, Callable[[list[Path]], Any]]:
    """Load `--model` for a benchmark and a pixel loader at its resolution; an unusable image stops the run."""
    from concurrent.futures import ThreadPoolExecutor

    from blip2cli.data.images import load_image
    from blip2cli.data.transforms import eval_pixels
    from blip2cli.errors import InputError
    from blip2cli.model.load import load_model

    model = load_model(name, device, dtype, quantize=quantize)
    cfg = model.cfg

    def pixels(paths: list[Path]) -> Any:
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:  # decoding JPEGs would otherwise starve the GPU
                images = list(pool.map(load_image, paths))
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
    counts = [(k, record[k]) for k in ("n", "n_images", "n_texts") if k in record]
    digits = 4 if record["task"] == "caption" else 2  # caption scores are fractions, the others percentages
    rows = counts + [(k, f"{v:.{digits}f}") for k, v in record["metrics"].items()]
    table(f"eval {record['task']}", ["metric", "score"], rows)
    for name, scores in record.get("domains", {}).items():
        table(f"NoCaps {name}", ["metric", "score"], [(k, f"{v:.4f}") for k, v in scores.items()])
    if record.get("question_types"):
        table("per question type", ["question type", "accuracy"], sorted(record["question_types"].items()))


EvalModelOpt = Annotated[
    str | None, typer.Option("--model", help="Run this model (hub id, HF folder, run folder, LAVIS .pth).")
]
EvalImagesOpt = Annotated[Path | None, typer.Option("--images", help="Image root of the benchmark (with --model).")]
EvalOutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Write scores.json and predictions.json here; a rerun resumes from predictions.jsonl."),
]


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
    model: EvalModelOpt = None,
    images: EvalImagesOpt = None,
    prompt: Annotated[
        str, typer.Option("--prompt", help="Caption prompt (the paper's COCO fine-tune prompt).")
    ] = "a photo of",
    num_beams: BeamsOpt = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    batch_size: BatchOpt = 16,
    out: EvalOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """COCO / NoCaps caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) as pycocoevalcap computes them.

    Scores are fractions (CIDEr 1.458 = 145.8). NoCaps also gets CIDEr and SPICE per domain.
    """
    from blip2cli.eval import caption as cap
    from blip2cli.eval import datasets as ds
    from blip2cli.eval import resume_log
    from blip2cli.model import presets

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
        net, pixels = _eval_model(model, device, dtype, quantize)
        options = _eval_options(presets.caption_options(net, prompt), num_beams, max_new_tokens, min_new_tokens)
        log = resume_log(out, {"task": "caption", "model": model, "annotations": str(annotations), "prompt": prompt,
                               "options": vars(options)})  # fmt: skip
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
        bool,
        typer.Option("--lemmatize", help="OK-VQA: lemmatise the predictions file's answers (model runs always do)."),
    ] = False,
    model: EvalModelOpt = None,
    images: EvalImagesOpt = None,
    template: Annotated[str, typer.Option("--template", help="Prompt template; {} is the question.")] = (
        "Question: {} Short answer:"
    ),
    num_beams: BeamsOpt = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    batch_size: BatchOpt = 16,
    out: EvalOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """VQAv2 / OK-VQA accuracy (official VQA rules, 0-100) and GQA exact-match accuracy."""
    from blip2cli.eval import datasets as ds
    from blip2cli.eval import resume_log, vqa
    from blip2cli.model import presets

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
        net, pixels = _eval_model(model, device, dtype, quantize)
        options = _eval_options(presets.vqa_options(net), num_beams, max_new_tokens, min_new_tokens)
        log = resume_log(out, {"task": f"vqa-{dataset}", "model": model, "questions": str(questions or annotations),
                               "template": template, "lemmatize": lemma, "options": vars(options)})  # fmt: skip
        jobs = [(q.question_id, p, template.format(clean_question(q.question))) for q, p in zip(items, paths)]
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
    model: EvalModelOpt = None,
    images: EvalImagesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    batch_size: BatchOpt = 16,
    out: EvalOutOpt = None,
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
        from blip2cli.eval import resume_log, retrieval

        paths = ds.resolve_images(images, [[p] for p in data.images])
        net, pixels = _eval_model(model, device, dtype, quantize)
        net.cfg.qformer.max_text_len = 35  # spec §8: retrieval evaluation pads/truncates texts at 35 tokens
        texts = [clean_caption(t) for t in data.texts]
        settings = {"task": f"retrieval-{dataset}", "model": model, "annotations": str(annotations), "k_test": k_test}
        log = resume_log(out, settings, "itm_rows.jsonl")  # a rerun with the same --out resumes the ITM re-ranking
        i2t, t2i = retrieval.retrieval_scores(net, paths, texts, pixels, batch_size, k_test, log=log)
        keep = max(k_test, 10)  # beyond k every cell is -100 and ranks by index: the saved lists are lossless
        i2t_ranked, t2i_ranked = retrieval.top_rankings(i2t, keep), retrieval.top_rankings(t2i, keep)
        rankings = {"dataset": dataset, "k_test": k_test, "i2t": i2t_ranked, "t2i": t2i_ranked}
    from blip2cli.eval.retrieval import gt_ranks_from_rankings, recall_metrics

    txt_ranks = gt_ranks_from_rankings(i2t_ranked, data.img2txt)
    metrics = recall_metrics(txt_ranks, gt_ranks_from_rankings(t2i_ranked, [[i] for i in data.txt2img]))
    record = {"task": "retrieval", "n_images": len(data.images), "n_texts": len(data.texts), "metrics": metrics}
    _eval_report(record, json_out, out, rankings)


def main() -> None:
    """Console-script entry point."""
    app()
