"""`blip2 ask` through the CLI on tiny offline models: questions, instructions, conversations and batch files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.model.llm import FrozenLLM

runner = CliRunner()


def ask(*args: str, model: Path, input: str | None = None):
    return runner.invoke(app, ["ask", *args, "--model", str(model), "--device", "cpu"], input=input)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "my photos" / "chat noir ☕.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (20, 20, 20)).save(path)
    return path


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], object]]:
    """(prompts, options) of every call into the language model; the real generation still runs."""
    seen: list[tuple[list[str], object]] = []
    original = FrozenLLM.generate

    def recording(self, prefix, texts, options):
        seen.append((list(texts), options))
        return original(self, prefix, texts, options)

    monkeypatch.setattr(FrozenLLM, "generate", recording)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# One question


def test_question_answered_for_people(tiny_opt_dir: Path, photo: Path) -> None:
    result = ask(str(photo), "What is in the picture?", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and result.stdout.strip()  # the answer alone on stdout


def test_question_json_template_and_vqa_settings(tiny_opt_dir: Path, photo: Path, prompts) -> None:
    result = ask(str(photo), "What is IN the picture?!", "--json", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    (record,) = json_lines(result.stdout)
    assert record["image"] == str(photo) and record["question"] == "What is IN the picture?!"
    assert isinstance(record["answer"], str)
    (texts, o), = prompts
    assert texts == ["Question: what is in the picture? Short answer:"]  # blip_question cleaning (LAVIS processors)
    assert (o.num_beams, o.max_new_tokens, o.min_new_tokens, o.length_penalty) == (5, 10, 0, 0.0)  # OPT (LAVIS configs)


def test_flan_t5_length_penalty_and_custom_template(tiny_t5_dir: Path, photo: Path, prompts) -> None:
    result = ask(str(photo), "how many cats?", "--template", "Q: {} A:", "--json", model=tiny_t5_dir)
    assert result.exit_code == 0, result.output
    (texts, o), = prompts
    assert texts == ["Q: how many cats? A:"] and o.length_penalty == -1.0


def test_instruct_sends_the_text_as_typed(tiny_opt_dir: Path, photo: Path, prompts) -> None:
    result = ask(str(photo), "Tell me about the history of this place.", "--instruct", "--json", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    (texts, o), = prompts
    assert texts == ["Tell me about the history of this place."] and o.max_new_tokens == 30


def test_sampling_is_repeatable_with_a_seed(tiny_opt_dir: Path, photo: Path, prompts) -> None:
    runs = [ask(str(photo), "what?", "--temperature", "1.5", "--seed", "3", "--json", model=tiny_opt_dir)
            for _ in range(2)]  # fmt: skip
    assert runs[0].stdout == runs[1].stdout and runs[0].exit_code == 0
    assert prompts[0][1].do_sample and prompts[0][1].num_beams == 1


def test_unreadable_image_is_an_error_record(tiny_opt_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = ask(str(bad), "what?", "--json", model=tiny_opt_dir)
    assert result.exit_code == 1
    (record,) = json_lines(result.stdout)
    assert record["question"] == "what?" and str(bad) in record["error"]


def test_exif_rotated_photo(tiny_opt_dir: Path, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (60, 20), "white").save(path, exif=exif.tobytes())
    result = ask(str(path), "what?", "--json", model=tiny_opt_dir)
    assert result.exit_code == 0 and "answer" in json_lines(result.stdout)[0]


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def test_chat_turns_carry_the_history(tiny_opt_dir: Path, photo: Path, prompts) -> None:
    result = ask(str(photo), "What is this?", "--chat", "--json", model=tiny_opt_dir,
                 input="Where is it?\nWhy?\n\nnever asked\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["question"] for r in records] == ["What is this?", "Where is it?", "Why?"]
    a1, a2 = (r["answer"].rstrip(".") for r in records[:2])
    assert [p for (p,), _ in prompts] == [
        "Question: what is this? Answer:",
        f"Question: what is this? Answer: {a1}. Question: where is it? Answer:",
        f"Question: what is this? Answer: {a1}. Question: where is it? Answer: {a2}. Question: why? Answer:",
    ]  # BLIP-2 Figure 4's conversation style


def test_chat_from_stdin_only_until_exit(tiny_opt_dir: Path, photo: Path) -> None:
    result = ask(str(photo), "--chat", "--json", model=tiny_opt_dir, input="first?\nexit\nsecond?\n")
    assert result.exit_code == 0
    assert [r["question"] for r in json_lines(result.stdout)] == ["first?"]


def test_chat_for_people_and_until_eof(tiny_opt_dir: Path, photo: Path) -> None:
    result = ask(str(photo), "--chat", model=tiny_opt_dir, input="one?\ntwo?")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2  # one answer per turn, on stdout


def test_chat_history_is_trimmed_to_what_flan_t5_reads(tiny_t5_dir: Path, photo: Path, prompts) -> None:
    turns = "".join(f"is there a dog on the beach number {i}?\n" for i in range(6))
    result = ask(str(photo), "--chat", "--json", model=tiny_t5_dir, input=turns)
    assert result.exit_code == 0 and len(json_lines(result.stdout)) == 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    last = prompts[-1][0][0]
    assert last.endswith("Question: is there a dog on the beach number 5? Answer:")
    assert len(tok(last).input_ids) <= 32  # FrozenLLM truncates T5 prompts at max_text_len


# ---------------------------------------------------------------------------------------------------------------
# Batch files


def _batch(tmp_path: Path, photo: Path) -> Path:
    folder = tmp_path / "batch"
    folder.mkdir()
    Image.new("L", (30, 30), 90).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [
        {"image": "grey.png", "question": "what colour?"},  # relative to the batch file's folder
        "not json at all",
        {"image": str(photo), "question": "is it dark?"},
        {"image": "broken.png", "question": "what?"},
        {"image": "grey.png"},
        {"image": "missing.png", "question": "what?"},
    ]
    path = folder / "questions.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    return path


def test_batch_answers_and_error_lines(tiny_opt_dir: Path, photo: Path, tmp_path: Path, prompts) -> None:
    path = _batch(tmp_path, photo)
    result = ask("--batch", str(path), "--json", model=tiny_opt_dir)
    assert result.exit_code == 1
    records = json_lines(result.stdout)
    assert len(records) == 6
    assert records[0]["image"] == str(path.parent / "grey.png") and "answer" in records[0]
    assert records[1] == {"line": 2, "error": f"{path}:2: not a JSON line"}
    assert records[2]["question"] == "is it dark?" and "answer" in records[2]
    assert "truncated or corrupt image" in records[3]["error"] or "not an image" in records[3]["error"]
    assert records[4]["line"] == 5 and "expected" in records[4]["error"]
    assert records[5]["error"].startswith("no such file")
    assert sorted(texts for texts, _ in prompts) == [
        ["Question: what colour? Short answer:", "Question: is it dark? Short answer:"]
    ]  # one forward pass for both readable images


def test_batch_out_resumes(tiny_opt_dir: Path, photo: Path, tmp_path: Path) -> None:
    path, out = _batch(tmp_path, photo), tmp_path / "answers.jsonl"
    first = ask("--batch", str(path), "--out", str(out), model=tiny_opt_dir)
    assert first.exit_code == 1 and all(line.count("\t") == 2 for line in first.stdout.splitlines())
    second = ask("--batch", str(path), "--out", str(out), "--json", model=tiny_opt_dir)
    assert "2 questions already answered" in second.stderr
    assert not any("answer" in r for r in json_lines(second.stdout))  # only the failures are tried again
    assert sum("answer" in r for r in json_lines(out.read_text())) == 2


# ---------------------------------------------------------------------------------------------------------------
# Usage errors


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "IMAGE: missing"),
        (["{photo}"], "QUESTION: missing"),
        (["{tmp}/nope.png", "what?"], "no such file"),
        (["{tmp}", "what?"], "is a folder"),
        (["{photo}", "what?", "--template", "Question: Answer:"], "--template"),
        (["{photo}", "what?", "--template", "Q: {} {x}"], "--template"),
        (["{photo}", "what?", "--template", "Q: {}", "--instruct"], "--template"),
        (["{photo}", "what?", "--batch", "{tmp}/q.jsonl"], "--batch"),
        (["--batch", "{tmp}/q.jsonl"], "no such file"),
        (["{photo}", "what?", "--sample", "--num-beams", "4"], "--num-beams"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tiny_opt_dir: Path, photo: Path, tmp_path: Path) -> None:
    result = ask(*(a.replace("{photo}", str(photo)).replace("{tmp}", str(tmp_path)) for a in args), model=tiny_opt_dir)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output and result.stdout == ""


def test_stage1_model_cannot_answer(tiny_retrieval_model_dir: Path, photo: Path) -> None:
    result = ask(str(photo), "what?", model=tiny_retrieval_model_dir)
    assert result.exit_code == 2 and "no language model" in result.stderr


def test_batch_out_refuses_other_settings_and_adds_nothing(tiny_opt_dir: Path, photo: Path, tmp_path: Path) -> None:
    path, out = _batch(tmp_path, photo), tmp_path / "answers.jsonl"
    ask("--batch", str(path), "--out", str(out), model=tiny_opt_dir)
    first = out.read_text()
    assert ask("--batch", str(path), "--out", str(out), model=tiny_opt_dir).exit_code == 1
    assert out.read_text() == first  # the same failures are not appended again
    changed = ask("--batch", str(path), "--out", str(out), "--template", "Q: {} A:", model=tiny_opt_dir)
    assert changed.exit_code == 2 and '(template: "Question: {} Short answer:" there, "Q: {} A:" now)' in changed.stderr
