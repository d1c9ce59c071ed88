import subprocess
import sys

from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("caption", "ask", "index", "search", "pretrain", "finetune", "eval", "env"):
        assert name in result.output


def test_help_does_not_import_torch():
    code = "import sys; from blip2cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_json_has_versions():
    import json

    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["blip2cli"] and info["torch"] and info["python"]
    assert "java" in info
