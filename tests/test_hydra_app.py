"""One test per reliance on Hydra's and OmegaConf's behaviour (listed in rethink/hydra_app.py's header), so that a
release that changes one fails here, by name, before it shows anywhere else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from rethink import hydra_app
from rethink.errors import UserError
from rethink.hydra_app import CONF_DIR, compose_config, sweep_jobs

ROOT = Path(__file__).resolve().parent.parent


def test_1_the_basic_sweepers_expansion_of_a_sweep_into_jobs():
    swept, jobs = sweep_jobs(["model=b0,v2_s", "seed=0,1", "trainer.epochs=2"], {"data.batch_size": "8"})
    assert swept == ["model", "seed"]
    assert jobs == [
        ["data.batch_size=8", f"model={m}", f"seed={s}", "trainer.epochs=2"] for m in ("b0", "v2_s") for s in (0, 1)
    ]


def test_2_a_failed_compositions_frame_holds_the_config_it_did_not_fit():
    hydra_app.register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose("config", overrides=["model=v2_s", "model.stages.9.block=fused"])
        except Exception as e:
            found = hydra_app._composition(e)
        else:
            pytest.fail("a ninth stage of v2_s composed")
    assert len(found["cfg"].model.stages) == 6 and found["defaults_list"].overrides.known_choices["model"] == "v2_s"


def test_3_composing_inside_a_running_app_puts_its_hydra_back():
    hydra_app.register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        running = GlobalHydra.instance().hydra
        assert running is not None
        compose_config(["model=b1"])
        assert GlobalHydra.instance().hydra is running


def test_4_hydra_full_error_makes_hydra_main_raise(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(
        "import hydra\n"
        "@hydra.main(version_base='1.3', config_path=None)\n"
        "def main(cfg):\n    raise ValueError('raised as it is')\n"
        "try:\n    main()\nexcept ValueError as e:\n    print('caught', e)\n"
    )
    out = subprocess.run(
        [sys.executable, str(app), f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        timeout=120,
    )
    assert "caught raised as it is" in out.stdout, out.stderr[-1000:]


def test_5_run_folders_are_resolved_before_anything_is_written_and_each_time_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["trainer.device=cpu"], with_hydra=True)
    assert not (tmp_path / "outputs").exists()  # not resolved yet: nothing made
    first = OmegaConf.select(cfg, "hydra.sweep.dir")
    assert Path(first).is_dir() and OmegaConf.select(cfg, "hydra.sweep.dir") == first  # claimed once, then remembered


@pytest.mark.slow
def test_6_a_sweep_with_a_failed_job_is_still_compared(tmp_path):
    """Hydra skips on_multirun_end after a failed job; the sweep callback counts the jobs itself."""
    tiny = [
        "data=synthetic",
        "data.images_per_class=10",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=8",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.device=cpu",
        "trainer.epochs=1",
        "trainer.cpu_threads=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.image_grid=false",
    ]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            *tiny,
            "optimizer.lr=0.01,-1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1
    assert "failed" in (tmp_path / "sweep" / "comparison.md").read_text()


def test_7_omegaconf_raises_some_override_mistakes_as_its_own_type_errors():
    with pytest.raises(UserError) as raised:
        compose_config(["model.stages.x.block=fused"])
    assert "\n" not in str(raised.value) and "model.stages.x.block=fused" in str(raised.value)
