"""Output-path and export flags of the scripts: a mistake is one line naming the flag, before any
work (not a traceback at the run's last write)."""

import pytest

from tests.script_runner import error_line, run_script


@pytest.mark.parametrize(
  "script, flag",
  [("export_hf", "out"), ("rm_report", "out_dir"), ("train_sft", "export_dir")],
)
def test_an_output_directory_that_is_a_file_is_a_usage_error(tmp_path, capfd, script, flag):
  a_file = tmp_path / "f"
  a_file.write_text("x")
  args = [f"--workdir={tmp_path / 'run'}", f"--{flag}={a_file}"]
  result = run_script(script, args, capfd)
  assert result.code == 2
  assert error_line(result).endswith(f"--{flag}={a_file}: is a file, not a directory")
  assert not (tmp_path / "run").exists()  # nothing ran
  assert a_file.read_text() == "x"


@pytest.mark.parametrize("script", ["export_hf", "train_sft"])
def test_an_unknown_model_type_names_the_flag_before_any_work(tmp_path, capfd, script):
  args = [f"--workdir={tmp_path / 'run'}", "--model_type=bert"]
  if script == "export_hf":
    args.append(f"--out={tmp_path / 'out'}")
  result = run_script(script, args, capfd)
  assert result.code == 2
  assert "--model_type=bert: must be one of ['gpt2', 'llama', 'mistral', 'qwen2']" in (
    error_line(result)
  )
  assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_export_of_a_run_whose_config_is_damaged_is_one_line(tmp_path, capfd):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text('{"kind": "pol')
  result = run_script("export_hf", [f"--workdir={run}", f"--out={tmp_path / 'out'}"], capfd)
  assert result.code == 2
  assert f"--workdir={run}: config.json is not valid JSON" in error_line(result)
