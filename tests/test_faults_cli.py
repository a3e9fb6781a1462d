"""Storage faults through the real `lm pretrain` command: one sentence and exit 2, nothing lost."""

import pytest
import yaml
from test_faults_storage import _hold_lock, _small_tmpfs

from lm.cli import main
from lm.config import to_dict


def _config_file(cfg, tmp_path, **train):
    tree = to_dict(cfg)
    tree["train"].update(train)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_pretrain_on_a_run_dir_another_run_owns_is_refused_naming_it(
    tiny_text_config, tmp_path, capsys
):
    run_dir = tmp_path / "owned"
    holder = _hold_lock(run_dir)
    try:
        config = _config_file(tiny_text_config, tmp_path, run_dir=str(run_dir))
        assert main(["pretrain", "--config", config]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pid {holder.pid}" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written


def test_pretrain_into_a_file_is_one_sentence(tiny_text_config, tmp_path, capsys):
    occupied = tmp_path / "a_file"
    occupied.write_text("not a directory")
    config = _config_file(tiny_text_config, tmp_path, run_dir=str(occupied))
    assert main(["pretrain", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(occupied) in err, err
    assert occupied.read_text() == "not a directory"


@pytest.mark.slow  # a whole tiny pretraining run
def test_pretrain_stops_at_a_save_the_full_disk_refuses_and_keeps_older_checkpoints(
    tiny_text_config, tmp_path, capsys
):
    # Each checkpoint of the tiny model with AdamW takes 0.55-0.85 MB and the first can be
    # the largest: 2.5 MB holds it with room to spare, but not the 3.9 MB of all six.
    with _small_tmpfs(tmp_path / "disk", "2500k") as disk:
        run_dir = disk / "run"
        config = _config_file(
            tiny_text_config, tmp_path, run_dir=str(run_dir), steps=12, sample_tokens=0
        )
        code = main(["pretrain", "--config", config, "checkpoint.every=2", "checkpoint.keep=10"])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("lm pretrain")]
        assert len(lines) == 1 and "No space left on device" in lines[0], err
        kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        assert kept and kept[-1] < 12 and f"newest: step {kept[-1]}" in lines[0]
