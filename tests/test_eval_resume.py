import json

from blip2cli.jsonl import run_resumable


def test_a_line_cut_by_a_kill_is_ended_before_appending(tmp_path):
    log = tmp_path / "predictions.jsonl"
    log.write_text(json.dumps({"id": 1, "answer": "yes"}) + "\n" + '{"id": 2, "ans')  # killed mid-line
    predict = lambda batch: [{"id": i, "answer": "no"} for i in batch]  # noqa: E731
    done = run_resumable([1, 2, 3], lambda i: i, "id", predict, 2, log, "test")
    assert set(done) == {1, 2, 3} and done[1]["answer"] == "yes"  # kept, not redone
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert [r["id"] for r in records] == [1, 2, 3]
    assert run_resumable([1, 2, 3], lambda i: i, "id", predict, 2, log, "test") == done  # resumes again


def test_a_bad_line_in_the_middle_is_a_clear_error(tmp_path):
    import pytest

    from blip2cli.errors import UsageError
    from blip2cli.jsonl import read_jsonl

    log = tmp_path / "log.jsonl"
    log.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(UsageError, match="log.jsonl:2: not a JSON record"):
        read_jsonl(log)


def test_reading_a_log_never_writes_it(tmp_path):
    from blip2cli.jsonl import read_jsonl

    log = tmp_path / "log.jsonl"
    log.write_text('{"id": 1}\n{"id": 2')  # cut off by a kill
    log.chmod(0o444)
    assert read_jsonl(log) == [{"id": 1}]
    assert log.read_text() == '{"id": 1}\n{"id": 2'
