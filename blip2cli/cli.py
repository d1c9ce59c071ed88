"""The `blip2` command line. Commands parse, load, call one library function and render.

Heavy libraries (torch, transformers, faiss) are imported inside command bodies so `blip2 --help` stays fast.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from blip2cli import __version__
from blip2cli.cli_help import HelpCommand, HelpGroup
from blip2cli.decoding import CAPTION_PROMPT, VQA_TEMPLATE, Decoding, describe
from blip2cli.errors import UsageError

if TYPE_CHECKING:
    from blip2cli.model.blip2 import Blip2
    from blip2cli.model.capabilities import Need

app = typer.Typer(
    name="blip2",
    help="BLIP-2 from the terminal: caption, ask, index, search, capfilt, pretrain, finetune and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=HelpGroup,
)
eval_app = typer.Typer(help="Score a model (or a predictions file) on the paper's benchmarks.", no_args_is_help=True,
                       cls=HelpGroup)
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

        parent.command(name, cls=HelpCommand)(wrapper)
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


TRAINING = {"pretrain", "finetune"}  # their data-loading workers need the cores: idle OpenMP threads sleep (threads.py)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, metavar="N", help="CPU threads for torch. Default: "
                                 "OMP_NUM_THREADS when set, else the physical cores; 1 is often faster on a machine "
                                 "busy with other jobs.")
    ] = None,
) -> None:
    """BLIP-2 from the terminal."""
    from blip2cli import threads as cpu_threads

    cpu_threads.configure(threads, passive=ctx.invoked_subcommand in TRAINING)


@command(app)
def env(json_out: JsonOpt = False) -> None:
    """Print versions of the project, Python, torch, transformers, faiss, CUDA, devices and Java."""
    from blip2cli import env as env_mod
    from blip2cli.render import emit, results

    info = env_mod.collect()
    if json_out:
        emit(info)
    else:
        results("blip2 env", ["what", "value"], [(k, v) for k, v in info.items()])


GenModelOpt = Annotated[
    str, typer.Option("--model", help="Hub id, Hugging Face BLIP-2 folder, blip2 run folder or LAVIS .pth.")
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Branch, tag or commit of a --model hub id (default: main).")
]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Hugging Face cache folder for --model hub ids (default: "
                              "HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).")
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
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders (recursed), globs (quote them), http(s) URLs, or - for "
                                  "an image on standard input.")
    ],
    model: GenModelOpt = "Salesforce/blip2-opt-2.7b",
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
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
    """Caption images: files, folders (recursed), globs, http(s) URLs and - (an image piped in).

    Decoding follows the BLIP-2 paper: beam search, 5 beams, at most 30 new tokens and at least min_length 8
    counting the prompt with BOS (7 new tokens without a prompt, 4 after "a photo of" on OPT; Flan-T5 7). Stage-1 models
    caption with the Q-Former: 3 beams, 29 new tokens, at least 9. --sample, --top-p or --temperature switch to
    nucleus sampling (one beam, so not with --num-beams); each flag overrides its default.

    With --prompt the model continues the prompt and the caption is the continuation only, as LAVIS returns it and
    `blip2 eval caption` scores it ("a dog on a beach" for --prompt "a photo of"); --keep-prompt prints both.

    Exit 1 when some images could not be read (each is reported on one line, the rest are captioned).
    """
    from blip2cli import caption as job
    from blip2cli.data.inputs import expand_sources
    from blip2cli.render import emit, error, line, note, progress, results, stdout_is_terminal

    paths = expand_sources(inputs)
    decoding = Decoding(num_beams, max_new_tokens, min_new_tokens, sample, top_p, temperature, num_captions).check()
    settings = {"prompt": prompt, "keep_prompt": keep_prompt, "seed": seed, "quantize": quantize, "revision": revision}
    log = job.open_log(out, model=model, decoding=decoding, **settings) if out is not None else None
    todo = job.pending(paths, log)
    if log is not None and len(todo) < len(paths):
        note(f"{len(paths) - len(todo)} of {len(paths)} images already captioned in {out}: skipped")
    if not todo:
        return
    net = _load(model, device, dtype, "caption", "caption", quantize, revision, cache_dir)
    _seed(seed)
    records = job.caption_images(net, todo, decoding=decoding, prompt=prompt, keep_prompt=keep_prompt,
                                 batch_size=batch_size, log=log)  # fmt: skip
    rows, failed, stream = [], 0, not json_out and not stdout_is_terminal()
    try:
        for record in progress(records, len(todo), "captioning", done="captioned"):
            failed += "error" in record
            if json_out:
                emit(record)
            elif "error" in record:
                error(record["error"])
            elif stream:  # a pipe or a file: path<TAB>caption, one line per caption, as they come
                for text in record.get("captions", [record["caption"]]):
                    line(record["image"], text)
            else:
                rows.append((record["image"], "\n".join(record.get("captions", [record["caption"]]))))
    except KeyboardInterrupt:
        _interrupted(log)
    finally:
        if log is not None:
            log.close()
        if rows:
            results(f"captions ({describe(job.caption_options(net, decoding, prompt))})", ["image", "caption"], rows)
    _wrote(log)
    _failures(failed, len(todo), "images")


def _load(name: str, device: str, dtype: str, need: Need, job: str, quantize: str = "none",
          revision: str | None = None, cache_dir: Path | None = None) -> Blip2:
    """Load `--model` and refuse it at once (one line, exit 2) when it cannot do the job."""
    from blip2cli.model.capabilities import require
    from blip2cli.model.load import load_model

    model = load_model(name, device, dtype, quantize=quantize, revision=revision, cache_dir=cache_dir)
    require(model, need, job, name)
    return model


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _interrupted(log: Any) -> None:
    from blip2cli.render import error

    saved = f"; {log.written} records are saved in {log.path}, rerun the same command to go on" if log else ""
    error(f"interrupted{saved}")
    raise typer.Exit(130)


def _wrote(log: Any) -> None:
    """Say what an --out file got from this run: "wrote 79 records to captions.jsonl"."""
    if log is not None:
        from blip2cli.render import wrote

        wrote(log.path, log.written)


def _failures(failed: int, total: int, what: str) -> None:
    if failed:
        from blip2cli.render import warn

        warn(f"{failed} of {total} {what} failed")
        raise typer.Exit(1)


@command(app)
def ask(
    image: Annotated[
        str | None, typer.Argument(help="The image: a file, an http(s) URL, or - to read it from standard input.",
                                   show_default=False)
    ] = None,
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
        bool, typer.Option("--chat", help="Conversation: then read questions from stdin, one a line (edited with "
                           "readline at a terminal), until an empty line, exit or EOF (Ctrl-D); each turn sees the "
                           "earlier ones."),
    ] = False,
    batch: Annotated[
        Path | None,
        typer.Option("--batch", help='JSONL file of {"image", "question"} lines (relative images are found from the '
                     "file's folder): one answer line each."),
    ] = None,
    model: GenModelOpt = "Salesforce/blip2-opt-2.7b",
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
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
    from blip2cli import ask as job
    from blip2cli.jsonl import JsonlLog
    from blip2cli.render import note

    tmpl = job.check_request(image=image, question=question, template=template, instruct=instruct, chat=chat,
                             batch=batch, out=out)  # fmt: skip
    decoding = Decoding(num_beams, max_new_tokens, min_new_tokens, sample, top_p, temperature).check()
    items: list[Any] = [job.BatchQuestion(0, image, question)] if batch is None else job.read_batch(batch)
    log: Any = None
    if batch is not None and out is not None:
        settings = {"template": tmpl, "instruct": instruct, "seed": seed, "quantize": quantize, "revision": revision}
        log = job.open_log(out, model=model, decoding=decoding, **settings)
        todo = job.pending(items, log)
        if len(todo) < len(items):
            note(f"{len(items) - len(todo)} questions already answered in {out}: skipped")
        items = todo
    net = _load(model, device, dtype, "answer", "ask", quantize, revision, cache_dir)
    _seed(seed)
    if log is None and out is not None:
        log = JsonlLog(out)
    try:
        if chat:
            options = job.answer_options(net, decoding, instruct)
            failed, total = _chat(net, image, question, tmpl, instruct, options, log, json_out)
        else:
            records = job.answer(net, items, decoding=decoding, template=tmpl, instruct=instruct,
                                 batch_size=batch_size if batch is not None else 1, log=log)  # fmt: skip
            failed, total = _show_answers(records, len(items), json_out, single=len(items) == 1)
    except KeyboardInterrupt:
        _interrupted(log)
    finally:
        if log is not None:
            log.close()
    _wrote(log)
    _failures(failed, total, "questions")


def _show_answers(records: Iterable[dict[str, Any]], total: int, json_out: bool, single: bool) -> tuple[int, int]:
    """Each record on stdout (--json) or errors as they come and a table of answers at the end; (failed, total)."""
    from blip2cli.render import emit, error, line, progress, results

    answered, failed = [], 0
    for record in progress(records, total, "answering", unit="questions", done="answered"):
        failed += "error" in record
        if json_out:
            emit(record)
        elif "error" in record:
            error(record["error"])
        else:
            answered.append(record)
    if not json_out and single and answered:
        line(answered[0]["answer"])  # the answer alone: ans=$(blip2 ask x.jpg "...")
    elif not json_out and answered:
        results("answers", ["image", "question", "answer"], [(r["image"], r["question"], r["answer"]) for r in answered])
    return failed, total


def _chat(net: Blip2, image: str, question: str | None, template: str, instruct: bool, options: Any,
          log: Any, json_out: bool) -> tuple[int, int]:  # fmt: skip
    """A conversation: the first question from the command line (if any), then one per stdin line (edited with
    readline at a terminal: chat_input)."""
    import sys

    from blip2cli.ask import Chat
    from blip2cli.caption import image_pixels
    from blip2cli.chat_input import questions
    from blip2cli.render import console, emit, error, line, plain, stdout_is_terminal

    pixels = image_pixels(image, net.cfg.vision.image_size, net.cfg.image_mean, net.cfg.image_std)
    if isinstance(pixels, str):
        record = {"image": image, "question": question or "", "error": pixels}
        if log is not None:
            log.write(record)
        emit(record) if json_out else error(pixels)
        return 1, 1
    talk = Chat(net, pixels, template, options, instruct)
    for_people = sys.stdin.isatty() and stdout_is_terminal()
    turns = 0
    for asked in questions(question):
        record = {"image": image, "question": asked, "answer": talk.ask(asked)}
        if log is not None:
            log.write(record)
        if json_out:
            emit(record)
        elif for_people:
            console.print(f"[bold]answer>[/] {plain(record['answer'])}", highlight=False)
        else:
            line(record["answer"])  # results on stdout
        turns += 1
    return 0, turns


@command(app)
def index(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursed) or quoted globs.")],
    index_dir: Annotated[Path, typer.Option("--index", help="Index folder: created, or updated incrementally.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Embedding model (default: the index's own, else Salesforce/blip2-itm-vit-g)."),
    ] = None,
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
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
    from blip2cli.render import emit, failed_input, progress, table, wrote
    from blip2cli.retrieval.indexer import index_images, load_encoder

    paths = expand_inputs(inputs)
    report = index_images(
        paths, index_dir, lambda name: load_encoder(name, device, dtype, batch_size, quantize, revision, cache_dir),
        model=model, batch_size=batch_size, workers=workers, index_key=index_key, export=export,
        progress=functools.partial(progress, done="indexed"),
    )
    if report is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    for failure in report.failed:
        failed_input(failure.path, failure.error)  # issue 10: one line, the path once
    record = report.record()
    if json_out:
        emit(record)
    else:
        counts = [(k, record[k]) for k in ("added", "updated", "removed", "unchanged")]
        rows = [*counts, ("failed", len(report.failed)), ("total", report.total)]
        table(f"blip2 index {index_dir}", ["", "files"], rows)
    if export is not None:
        wrote(export)
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
    image: Annotated[
        str | None, typer.Option("--image", help="Find images similar to this one: a file, an http(s) URL, or - "
                                 "(standard input).")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a page of thumbnails and scores.")] = None,
    dedup: Annotated[
        float | None, typer.Option("--dedup", help="Drop near-duplicates (pooled cosine >= this, e.g. 0.94).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model for the query (default: the one the index was built with).")
    ] = None,
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per ITM forward pass.")] = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: Annotated[
        str | None, typer.Option("--quantize", help="none, int8 or int4 (default: what the index was built with; "
                                 "another is refused).", show_default=False)
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Search an index by text (ITC max over the 32 query vectors, then ITM re-rank) or by image.

    score = ITM logit + ITC cosine when re-ranked, else the ITC cosine. For --image, score is the image-to-image
    similarity: the mean over query vectors of the best-matching cosine, averaged both ways."""
    from blip2cli.render import emit, note, results, warn, wrote
    from blip2cli.retrieval.export import write_html
    from blip2cli.retrieval.indexer import load_encoder
    from blip2cli.retrieval.rank import search_index

    if (query is None) == (image is None):
        raise UsageError("give a QUERY text or --image PATH (exactly one of them)")
    if image == "-":
        from blip2cli.data.inputs import check_stdin

        check_stdin()
    result = search_index(
        index_dir, lambda name, quantized: load_encoder(name, device, dtype, batch_size, quantized, revision, cache_dir),
        query, image, model=model, quantize=quantize, k=k, rerank_k=rerank_k if rerank and image is None else None,
        dedup_threshold=dedup,
    )
    if quantize is None and result.quantize != "none":
        note(f"--quantize {result.quantize}: the index was built with it")
    if result.stale_index:
        warn(f"the index in {index_dir} is older than its store (interrupted run?): rerun `blip2 index` to refresh")
    if result.skipped:
        warn(f"skipped {len(result.skipped)} indexed files that no longer exist (rerun `blip2 index` to drop them)")
    if html is not None:
        write_html(html, result.hits, query, image, model=result.model, index=index_dir)
    if json_out:
        for hit in result.hits:
            emit(hit.record())
    else:
        rows = [(h.rank, f"{h.score:.4f}", f"{h.itc:.4f}", "" if h.itm is None else f"{h.itm:.3f}", h.path)
                for h in result.hits]
        results(f"blip2 search: {query if image is None else image}", ["rank", "score", "itc", "itm", "path"], rows)
    if html is not None:
        wrote(html)


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
           json_out: bool, stage: int | None, command: Literal["pretrain", "finetune"]) -> None:
    """Shared body of pretrain and finetune: load and check the recipe, train, report."""
    from blip2cli.config import load_training_recipe
    from blip2cli.render import emit
    from blip2cli.train import loop

    from blip2cli.train.checkpoint import reported_faults

    loaded = load_training_recipe(recipe, sets, command, stage)
    out = out or Path("runs") / recipe.stem
    with reported_faults(out):  # Ctrl-C says what was saved (exit 130); a full disk is one line (exit 1)
        step, main = loop.run(loaded, out=out, resume=resume, stop_after=max_steps, on_log=emit if json_out else None)
    if json_out and main:
        emit({"out": str(out), "step": step})


@command(app)
def pretrain(
    recipe: RecipeArg,
    stage: Annotated[int | None, typer.Option("--stage", min=1, max=2, help="1: ITC + ITM + ITG on the "
                     "Q-Former; 2: LM loss through the frozen LLM. Default: the recipe's stage.")] = None,
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
    _train(recipe, sets or [], out, resume, max_steps, json_out, stage, "pretrain")


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
    _train(recipe, sets or [], out, resume, max_steps, json_out, None, "finetune")


def _eval_report(record: dict[str, Any], json_out: bool, out: Path | None, ran_model: bool) -> None:
    """Warnings on stderr; one JSON line or tables; then what was written to --out."""
    from blip2cli.render import emit, warn, wrote

    for message in record.get("warnings", []):
        warn(message)
    if json_out:
        emit(record)
    else:
        _score_tables(record)
    if out is not None:
        scores = out / "scores.json"
        wrote(f"{scores} and {out / 'predictions.json'}" if ran_model else scores)


def _score_tables(record: dict[str, Any]) -> None:
    from blip2cli.render import table

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
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    images: EvalImagesOpt = None,
    prompt: Annotated[
        str, typer.Option("--prompt", help="Caption prompt (the paper's COCO fine-tune prompt).")
    ] = CAPTION_PROMPT,
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
    from blip2cli.eval.caption import eval_caption as job

    record = job(
        annotations=annotations, predictions=predictions, model=model, images=images, dataset=dataset,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()], prompt=prompt,
        decoding=Decoding(num_beams, max_new_tokens, min_new_tokens).check(), device=device, dtype=dtype,
        quantize=quantize, batch_size=batch_size, out=out, revision=revision, cache_dir=cache_dir,
    )
    _eval_report(record, json_out, out, predictions is None)


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
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    images: EvalImagesOpt = None,
    template: Annotated[str, typer.Option("--template", help="Prompt template; {} is the question.")] = VQA_TEMPLATE,
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
    from blip2cli.eval.vqa import eval_vqa as job

    record = job(
        annotations=annotations, questions=questions, predictions=predictions, model=model, images=images,
        dataset=dataset, normalize=normalize, lemmatize_predictions=lemmatize, template=template,
        decoding=Decoding(num_beams, max_new_tokens, min_new_tokens).check(), device=device, dtype=dtype,
        quantize=quantize, batch_size=batch_size, out=out, revision=revision, cache_dir=cache_dir,
    )
    _eval_report(record, json_out, out, predictions is None)


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
    revision: RevisionOpt = None,
    cache_dir: CacheDirOpt = None,
    images: EvalImagesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    batch_size: BatchOpt = 16,
    out: EvalOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """COCO 5k / Flickr30K 1k image-text retrieval recall (percent): ITC top-k, then ITM + ITC, as LAVIS evaluates
    it (texts cut at 35 tokens)."""
    from blip2cli.eval.retrieval import eval_retrieval as job

    record = job(
        annotations=annotations, predictions=predictions, model=model, images=images, dataset=dataset,
        k_test=k_test, max_text_len=35, device=device, dtype=dtype, quantize=quantize, batch_size=batch_size,
        out=out, revision=revision, cache_dir=cache_dir,
    )
    _eval_report(record, json_out, out, predictions is None)


@command(app)
def capfilt(
    inputs: Annotated[list[str], typer.Argument(help="Webdataset .tar shards (or a folder of them), a COCO/LAVIS "
                                                "json, a JSONL of {image, caption}, image files, folders or globs.")],
    out: Annotated[Path, typer.Option("--out", help="FILE.jsonl (one line per image) or a folder of webdataset "
                                      "shards that recipes read. A rerun finishes the job.")],
    captioner: Annotated[str, typer.Option("--captioner", help="The model that samples captions (any --model).")] = (
        "Salesforce/blip2-opt-2.7b"),
    scorer: Annotated[str, typer.Option("--scorer", help="The model whose ITC ranks the texts: any --model with "
                                        "ITC/ITM heads, or a CLIP model (openai/clip-vit-large-patch14, as the paper).")] = "Salesforce/blip2-itm-vit-g",
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of the --captioner and "
                                                 "--scorer hub ids (default: main).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Hugging Face cache folder for the "
                                                   "--captioner and --scorer hub ids (default: HF_HUB_CACHE).")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=0, help="Captions sampled per image.")] = 10,
    keep: Annotated[int, typer.Option("--keep", min=1, help="Texts kept per image, best first.")] = 2,
    prompt: Annotated[str, typer.Option("--prompt", help='The captioner\'s prompt, e.g. "a picture of".')] = "",
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.9,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest caption, in tokens.")] = 30,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens", min=0, help="Shortest caption.")] = 5,
    filter_: Annotated[str, typer.Option("--filter", help="none, or itm: drop texts the scorer's ITM head "
                                         "judges unmatched (BLIP v1's filter).")] = "none",
    threshold: Annotated[float, typer.Option("--threshold", help="ITM match probability a text needs with "
                                             "--filter itm.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (each image is seeded from it and its key).")] = 0,
    images: Annotated[Path | None, typer.Option("--images", help="Image root of annotation files (default: the "
                                                "file's folder).")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per output shard for inputs that "
                                            "are not shards.")] = 1000,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    json_out: JsonOpt = False,
) -> None:
    """Bootstrap captions for web images (CapFilt): sample captions, rank them with the original text, keep the best.

    For each image, --num-samples nucleus-sampled captions from --captioner compete with the original text (a
    shard's txt/json caption, an annotation's caption) under --scorer's ITC (max over the 32 queries); the top
    --keep are written best first, with their scores. Interrupting is safe, even kill -9: rerun to finish. Under
    torchrun / accelerate launch each process takes a share. Exit code 1 if some images could not be read."""
    from blip2cli.capfilt.job import CapfiltSettings
    from blip2cli.capfilt.job import capfilt as run_capfilt
    from blip2cli.capfilt.scorers import Blip2Scorer, load_scorer
    from blip2cli.capfilt.sources import read_sources
    from blip2cli.model.load import load_model
    from blip2cli.render import emit, progress, table, warn, wrote

    settings = CapfiltSettings(
        num_samples=num_samples, keep=keep, prompt=prompt, top_p=top_p, temperature=temperature,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, filter=filter_, threshold=threshold,
        seed=seed, captioner=captioner, scorer=scorer, quantize=quantize,
    )  # fmt: skip
    groups = read_sources(inputs, shard_size, images)
    scoring = load_scorer(scorer, device, dtype, need_itm=settings.filter == "itm", quantize=quantize,
                          revision=revision, cache_dir=cache_dir)
    same = captioner == scorer and isinstance(scoring, Blip2Scorer)  # a stage-1 model can do both: load it once
    captioning = scoring.model if same else load_model(captioner, device, dtype, quantize=quantize, revision=revision,
                                                       cache_dir=cache_dir)
    try:
        report = run_capfilt(captioning, scoring, groups, settings, out, batch_size=batch_size, warn=warn,
                             progress=functools.partial(progress, done="captioned and ranked"))
    except KeyboardInterrupt:
        from blip2cli.render import error

        error(f"interrupted; finished work is saved in {out}, rerun the same command to go on")
        raise typer.Exit(130) from None
    if report is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    record = report.record()
    if json_out:
        emit(record)
    else:
        table("capfilt", ["out", "images", "kept", "dropped", "failed", "skipped", "images/s"],
              [[record["out"], record["images"], record["kept"], record["dropped"], len(record["failed"]),
                record["skipped"], record["images_per_s"]]])
    wrote(out, report.images)
    if report.failed:
        warn(f"{len(report.failed)} images or shard members could not be used (each is named above)")
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
