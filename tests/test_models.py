"""The builder against torchvision: parameter counts, state_dict layout, equal outputs, stage overrides."""

import pytest
import torch
import torchvision.models as tvm

from rethink.errors import UserError
from rethink.models import create_model, load_torchvision_weights
from rethink.models.pretrained import load_pretrained, load_weights
from rethink.models.profile import count_gmacs, count_params, stage_table
from rethink.models.spec import SpecError, drop_path_rates, make_divisible, network_spec, scale_repeats

MODELS = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "v2_s", "v2_m", "v2_l"]

# DESIGN.md section 2: (params at 1000 classes, params at 5 classes)
REFERENCE_PARAMS = {
    "b0": (5_288_548, 4_013_953),
    "b1": (7_794_184, 6_519_589),
    "b2": (9_109_994, 7_708_039),
    "b3": (12_233_232, 10_703_917),
    "b4": (19_341_616, 17_557_581),
    "b5": (30_389_784, 28_351_029),
    "b6": (43_040_704, 40_747_229),
    "b7": (66_347_960, 63_799_765),
    "v2_s": (21_458_488, 20_183_893),
    "v2_m": (54_139_356, 52_864_761),
    "v2_l": (118_515_272, 117_240_677),
}


def torchvision_model(name: str, num_classes: int) -> torch.nn.Module:
    return getattr(tvm, f"efficientnet_{name}")(num_classes=num_classes)


def meta_model(name: str, num_classes: int = 1000, overrides=()):
    with torch.device("meta"):
        return create_model(name, num_classes, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_match_torchvision_and_the_design_table(name):
    for index, num_classes in enumerate((1000, 5)):
        with torch.device("meta"):
            theirs = count_params(torchvision_model(name, num_classes))
        ours = count_params(meta_model(name, num_classes))
        assert ours == theirs == REFERENCE_PARAMS[name][index]


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_order_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        theirs = torchvision_model(name, 1000).state_dict()
    ours = meta_model(name).state_dict()
    assert [tuple(t.shape) for t in ours.values()] == [tuple(t.shape) for t in theirs.values()]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_weights_give_identical_outputs(name):
    torch.manual_seed(0)
    theirs = torchvision_model(name, 5).eval()
    for module in theirs.modules():  # non-trivial BN statistics, so that a mismapped buffer shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    ours = create_model(name, 5).eval()
    report = load_torchvision_weights(ours, theirs.state_dict())
    assert report.complete, str(report)
    assert len(report.loaded) == len(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative < 1e-5


def test_changed_layout_loads_what_fits_and_reports_the_rest():
    with torch.device("meta"):
        theirs = torchvision_model("v2_s", 1000).state_dict()
    theirs = {k: torch.zeros(v.shape) for k, v in theirs.items()}
    ours = create_model("v2_s", 5, ["model.stages.3.block=fused"])
    report = load_torchvision_weights(ours, theirs)
    kept = report.kept_initial
    assert "classifier.weight" in kept and "classifier.bias" in kept
    assert "stages.3.0.expand.conv.weight" in kept  # 3x3 fused expand vs 1x1 MBConv expand
    assert not any(k.startswith("stages.2.") or k.startswith("stages.4.") for k in kept)
    assert any(k.startswith("features.4.0.block.2.") for k in report.unused)  # the SE that has no place
    text = str(report)
    assert "kept initial" in text and "classifier.weight 5x1280 vs 1000x1280" in text
    assert ours.stages[0][0].project.conv.weight.abs().sum() == 0  # loaded from the zero source


@pytest.mark.slow
def test_stage_override_switches_block_and_drops_se():
    fused = meta_model("v2_l", 1000, ["model.stages.3.block=fused"])
    assert count_params(fused) == 128_657_024
    assert count_params(meta_model("v2_l", 5, ["model.stages.3.block=fused"])) == 127_382_429
    assert count_params(meta_model("v2_l", 1000, ["stages=v2_l_shallow_fused"])) == 128_657_024
    assert count_params(meta_model("v2_s", 1000, ["stages=v2_s_shallow_fused"])) == 24_005_000
    assert count_params(meta_model("v2_s", 5, ["stages=v2_s_shallow_fused"])) == 22_730_405
    # asked for explicitly, a fused stage keeps its SE
    with_se = meta_model("v2_s", 1000, ["model.stages.3.block=fused", "model.stages.3.se=0.25"])
    assert count_params(with_se) > 24_005_000
    assert type(with_se.stages[3][0].se).__name__ == "SqueezeExcite"


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("model.stages.1.expand=3", "expand", 3),
        ("model.stages.1.kernel=5", "kernel", 5),
        ("model.stages.1.repeats=1", "repeats", 1),
        ("model.stages.1.out=32", "channels", 32),
        ("model.stages.1.se=0.5", "se", 0.5),
    ],
)
def test_any_stage_field_changes_from_the_override_grammar(override, field, value):
    base = stage_table(meta_model("b0"))
    changed = stage_table(meta_model("b0", 1000, [override]))
    row = next(r for r in changed if r["stage"] == 1)
    assert row[field] == value
    assert row["params"] != next(r for r in base if r["stage"] == 1)["params"]


def test_v1_layout_scales_with_width_and_depth():
    b4 = network_spec(
        {
            "width": 1.4,
            "depth": 1.8,
            "stem": 32,
            "head": 1280,
            "stages": [{"block": "mbconv", "expand": 6, "kernel": 5, "stride": 2, "out": 40, "repeats": 2}],
        }
    )
    assert b4.stem == 48 and b4.head == 1792
    assert b4.stages[0].out == 56 and b4.stages[0].repeats == 4
    assert b4.stages[0].se == 0.25  # the mbconv default


def test_make_divisible_and_depth_rounding():
    assert make_divisible(32 * 1.1) == 32  # 35.2 -> 32 (not below 90%)
    assert make_divisible(16 * 1.8) == 32  # 28.8 -> 32
    assert make_divisible(24 * 1.1) == 24  # 26.4 -> 24, within 10%
    assert make_divisible(40 * 1.6) == 64
    assert make_divisible(3) == 8
    assert scale_repeats(3, 1.1) == 4 and scale_repeats(2, 1.0) == 2 and scale_repeats(1, 3.1) == 4


def test_drop_path_schedules():
    assert drop_path_rates(4, 0.2, "linear") == [0.0, 0.05, 0.1, 0.15000000000000002]
    assert drop_path_rates(3, 0.2, "uniform") == [0.2, 0.2, 0.2]
    model = create_model("b0", 10, ["model.drop_path_rate=0.4"])
    rates = [block.drop_path.p for stage in model.stages for block in stage]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.4 * 15 / 16)
    assert rates == sorted(rates)
    uniform = create_model("b0", 10, ["model.drop_path_schedule=uniform"])
    assert {block.drop_path.p for stage in uniform.stages for block in stage} == {0.2}


def test_drop_path_matches_torchvision_stochastic_depth_in_train_mode():
    from torchvision.ops import stochastic_depth

    from rethink.models.blocks import DropPath

    x = torch.randn(64, 8, 4, 4)
    torch.manual_seed(1)
    ours = DropPath(0.3).train()(x)
    torch.manual_seed(1)
    theirs = stochastic_depth(x, 0.3, "row", training=True)
    assert torch.equal(ours, theirs)
    assert torch.equal(DropPath(0.3).eval()(x), x)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.stages.0.stride=3", "model.stages.0.stride"),
        ("model.stages.0.kernel=4", "model.stages.0.kernel"),
        ("model.stages.0.repeats=0", "model.stages.0.repeats"),
        ("model.stages.0.se=1.5", "model.stages.0.se"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ],
)
def test_impossible_values_name_their_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        create_model("b0", 10, [override])


def test_spec_errors_are_value_errors_without_torch():
    with pytest.raises(SpecError, match="block type"):
        network_spec({"stages": [{"block": "resnet", "out": 8}]})


def test_gmacs_and_stage_table():
    b0 = meta_model("b0")
    assert round(count_gmacs(b0, 224), 2) == 0.39
    table = stage_table(b0)
    assert [r["stage"] for r in table] == ["stem", 0, 1, 2, 3, 4, 5, 6, "head"]
    assert sum(r["params"] for r in table) == 5_288_548


def test_freeze_backbone_keeps_bn_in_eval_mode():
    model = create_model("b0", 3)
    model.freeze_backbone()
    model.train()
    assert not any(p.requires_grad for p in model.stages.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not model.stem.bn.training and not model.stages[3][0].depthwise.bn.training
    assert model.classifier.training


def test_pretrained_from_a_saved_state_dict(tmp_path):
    source = create_model("b0", 3)
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    target = create_model("b0", 3)
    report, norm = load_pretrained(target, str(tmp_path / "sd.pt"), None)
    assert report.complete and norm is None
    assert torch.equal(target.stem.conv.weight, source.stem.conv.weight)
    torch.save(torchvision_model("b0", 1000).state_dict(), tmp_path / "tv.pt")
    report, _ = load_pretrained(create_model("b0", 3), str(tmp_path / "tv.pt"), None)
    assert report.kept_initial == ["classifier.weight", "classifier.bias"]
    with pytest.raises(UserError, match="no such file"):
        load_pretrained(target, str(tmp_path / "missing.pt"), None)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable state_dict"):
        load_pretrained(target, str(tmp_path / "junk.pt"), None)


def test_pretrained_true_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RETHINK_NO_DOWNLOAD", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="model.pretrained=true: .*not in the torch hub cache"):
        load_pretrained(create_model("b0", 3), True, "EfficientNet_B0_Weights.IMAGENET1K_V1")


def test_load_weights_reports_mismatches():
    source = create_model("b0", 10).state_dict()
    report = load_weights(create_model("b1", 10), source)
    assert report.loaded and report.missing  # b1 has more blocks
