"""`abliterate crosslingual`: per-language directions, their cosines, PCA, transfer matrix, plots and CLI errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import BYTE_VOCAB, build, save_tokenizer

from abliterate.cli import cli
from abliterate.commands.crosslingual import (
    ANSWERS_FILE,
    BASELINE,
    PLOT_FILES,
    REPORT_FILE,
    CrosslingualOptions,
    pca_2d,
    run_crosslingual,
    transfer_verdict,
)
from abliterate.direction.vector import Direction
from abliterate.errors import DataError, UsageError
from abliterate.prompts.records import KINDS
from abliterate.settings import Settings

FAST = dict(n_train=4, n_val=2, screen_prompts=2, finalists=2, batch_size=16)
LANGS = ["en", "de", "th"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crosslingual") / "tiny"
    build("llama", folder, extra=dict(vocab_size=BYTE_VOCAB, max_position_embeddings=2048))
    save_tokenizer(folder, byte_level=True)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xl") / "out"
    settings = Settings(model=str(tiny_chat), out=out, **FAST)
    options = CrosslingualOptions.parse(",".join(LANGS), transfer_prompts=3, transfer_max_new_tokens=3)
    run_crosslingual(settings, options)
    return out


def _report(folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    return report


def _check_images(folder: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(folder / name) as image:
            assert image.size[0] > 200 and image.size[1] > 200


def test_report_structure(tiny_run: Path) -> None:
    report = _report(tiny_run)
    assert report["languages"] == LANGS
    assert report["chosen_by"] == "selection on en"
    assert 1 <= report["layer"] < 3 and report["pos"] < 0
    assert set(report["prompts"]) == set(LANGS)
    assert report["plots"] == list(PLOT_FILES.values())
    _check_images(tiny_run, report["plots"])


def test_cosine_matrix_is_symmetric_with_unit_diagonal(tiny_run: Path) -> None:
    matrix = _report(tiny_run)["cosine"]["matrix"]
    assert len(matrix) == len(LANGS) and all(len(row) == len(LANGS) for row in matrix)
    for i in range(len(LANGS)):
        assert matrix[i][i] == pytest.approx(1.0, abs=1e-4)
        for j in range(len(LANGS)):
            assert matrix[i][j] == pytest.approx(matrix[j][i], abs=1e-4)
            assert -1.0 - 1e-4 <= matrix[i][j] <= 1.0 + 1e-4


def test_per_layer_cosines(tiny_run: Path) -> None:
    report = _report(tiny_run)
    per_layer = report["per_layer_cosine"]
    assert per_layer["layers"] == [0, 1, 2] and per_layer["pos"] == report["pos"]
    layer = report["layer"]
    for i, source in enumerate(LANGS):
        assert set(per_layer["curves"][source]) == set(LANGS)
        for j, target in enumerate(LANGS):
            curve = per_layer["curves"][source][target]
            assert len(curve) == 3
            assert curve[0] is None  # layer 0: template-token embeddings are identical, the difference is zero
            assert curve[layer] == pytest.approx(report["cosine"]["matrix"][i][j], abs=1e-3)


def test_pca_coordinates(tiny_run: Path) -> None:
    report = _report(tiny_run)
    for lang in LANGS:
        pca = report["pca"][lang]
        assert len(pca["harmful"]) == report["prompts"][lang]["harmful_train"]
        assert len(pca["harmless"]) == report["prompts"][lang]["harmless_train"]
        assert all(len(point) == 2 for point in pca["harmful"] + pca["harmless"])
        assert set(pca["arrows"]) == set(LANGS)
        ratios = pca["explained_variance_ratio"]
        assert len(ratios) == 2 and 0 <= ratios[1] <= ratios[0] <= 1
        # the axes are oriented so that the language's own difference points to +x
        assert pca["harmful_centroid"][0] >= pca["harmless_centroid"][0]


def test_transfer_matrix(tiny_run: Path) -> None:
    transfer = _report(tiny_run)["transfer"]
    assert transfer["rows"] == [BASELINE, *LANGS] and transfer["columns"] == LANGS
    for table in ("compliance", "refusal_rate", "n"):
        assert len(transfer[table]) == len(LANGS) + 1 and all(len(r) == len(LANGS) for r in transfer[table])
    assert all(n == 3 for row in transfer["n"] for n in row)
    for c_row, r_row in zip(transfer["compliance"], transfer["refusal_rate"], strict=True):
        for c, r in zip(c_row, r_row, strict=True):
            assert c == pytest.approx(1 - r) and 0 <= c <= 1
    assert transfer["generations"] == (len(LANGS) + 1) * len(LANGS) * 3
    assert len(transfer["cells"]) == (len(LANGS) + 1) * len(LANGS)
    answers = (tiny_run / ANSWERS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(answers) == transfer["generations"]
    assert {"source", "target", "prompt", "answer", "refusal"} <= set(json.loads(answers[0]))
    assert transfer["verdict"]["verdict"] in {"shared", "partly shared", "not shared", "not removed",
                                              "no refusal to remove"}


def _cells(base: list[float], matrix: list[list[float]], langs: list[str]) -> dict[tuple[str, str], float]:
    cells = {(BASELINE, t): r for t, r in zip(langs, base, strict=True)}
    cells.update({(s, t): matrix[i][j] for i, s in enumerate(langs) for j, t in enumerate(langs)})
    return cells


@pytest.mark.parametrize(
    ("base", "matrix", "verdict"),
    [
        # every language's direction removes every language's refusal
        ([0.9, 0.8, 0.9], [[0.0, 0.1, 0.2], [0.1, 0.0, 0.0], [0.2, 0.1, 0.0]], "shared"),
        # the negative control: only the diagonal moves
        ([0.9, 0.8, 0.9], [[0.0, 0.8, 0.9], [0.9, 0.1, 0.9], [0.9, 0.7, 0.0]], "not shared"),
        # half the cross-language cells
        ([0.9, 0.8, 0.9], [[0.0, 0.1, 0.9], [0.1, 0.0, 0.9], [0.9, 0.7, 0.0]], "partly shared"),
        # only one language's own direction works, on its own language: not shared
        ([0.9, 0.8, 0.9], [[0.7, 0.8, 0.9], [0.9, 0.6, 0.9], [0.9, 0.7, 0.0]], "not shared"),
        # no own direction works: nothing is mediated at this site
        ([0.9, 0.8, 0.9], [[0.7, 0.1, 0.9], [0.9, 0.6, 0.9], [0.9, 0.7, 0.5]], "not removed"),
        # nobody refuses before
        ([0.1, 0.0, 0.2], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], "no refusal to remove"),
    ],
)
def test_transfer_verdict(base: list[float], matrix: list[list[float]], verdict: str) -> None:
    langs = ["en", "de", "zh"]
    result = transfer_verdict(_cells(base, matrix, langs), langs)
    assert result["verdict"] == verdict
    assert result["summary"].startswith({"shared": "refusal is shared", "not shared": "refusal is NOT shared",
                                         "partly shared": "refusal is partly shared",
                                         "not removed": "refusal NOT removed",
                                         "no refusal to remove": "no refusal to remove"}[verdict])


def test_transfer_verdict_leaves_out_targets_that_were_not_refused() -> None:
    langs = ["en", "de", "it"]
    # it is hardly refused unedited (0.1): its column says nothing about transfer, even though nothing moves
    base = [0.9, 0.9, 0.1]
    matrix = [[0.0, 0.0, 0.1], [0.0, 0.0, 0.1], [0.0, 0.0, 0.1]]
    result = transfer_verdict(_cells(base, matrix, langs), langs)
    # it's own direction still counts on the en and de targets: 2 own cells, 4 cross-language ones
    assert (result["verdict"], result["own_cells"], result["other_cells"]) == ("shared", 2, 4)
    assert result["baseline_refusal"] == pytest.approx(0.9) and result["other_left"] == pytest.approx(0.0)


def test_pca_2d_recovers_the_main_axis() -> None:
    torch.manual_seed(0)
    points = torch.randn(50, 6, dtype=torch.float64) * 0.01
    points[:, 2] += torch.linspace(-5, 5, 50, dtype=torch.float64)
    _, components, coords, ratios = pca_2d(points)
    assert abs(float(components[0, 2])) > 0.999
    assert ratios[0] > 0.99 and coords.shape == (50, 2)


def test_site_from_flags_and_direction_file(tiny_chat: Path, tmp_path: Path) -> None:
    flags = Settings(model=str(tiny_chat), out=tmp_path / "flags", layer=2, pos=-1, **FAST)
    options = CrosslingualOptions.parse("en,fr", transfer=False, plots=False)
    report = run_crosslingual(flags, options).report
    assert (report.layer, report.pos, report.chosen_by) == (2, -1, "--layer/--pos")
    assert report.transfer is None and report.plots == []
    assert "transfer" not in _report(tmp_path / "flags")  # absent from the file, not null
    assert not (tmp_path / "flags" / ANSWERS_FILE).exists()

    path = Direction(torch.ones(32), layer=1, pos=-2).save(tmp_path / "d.safetensors")
    from_file = Settings(model=str(tiny_chat), out=tmp_path / "file", **FAST)
    options = CrosslingualOptions.parse("en,fr", direction=path, transfer=False, plots=False)
    report = run_crosslingual(from_file, options).report
    assert (report.layer, report.pos) == (1, -2)
    assert set(report.direction_file_cosine or {}) == {"en", "fr"}


def test_option_errors() -> None:
    with pytest.raises(UsageError, match="unknown language"):
        CrosslingualOptions.parse("en,xx")
    with pytest.raises(UsageError, match="at least two"):
        CrosslingualOptions.parse("en,en")
    with pytest.raises(UsageError, match="unknown language"):
        CrosslingualOptions.parse("en,de", source_lang="klingon")
    assert CrosslingualOptions.parse("all").langs[:2] == ["ar", "de"]
    assert CrosslingualOptions.parse(" DE, en ", source_lang="en").source_lang == "en"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--langs", "en,xx"], "unknown language code 'xx'"),
        (["--langs", "en"], "at least two languages"),
        (["--layer", "7", "--pos", "-1"], "--layer 7 is out of range"),
        (["--layer", "1", "--pos", "-99"], "--pos -99 is out of range"),
        (["--direction", "missing.safetensors"], "direction file missing.safetensors not found"),
        (["--layer", "0", "--pos", "-1"], "difference in means is zero at layer 0"),
    ],
)
def test_cli_errors(tiny_chat: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    args = ["crosslingual", str(tiny_chat), "--langs", "en,de", "--out", str(tmp_path / "o"), "--n-train", "2"]
    result = CliRunner().invoke(cli, [*args, "--no-transfer", "--no-plots", *extra])
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError)
    assert message in result.exception.one_line()
    assert result.exception.hint
    assert not (tmp_path / "o").exists()


def test_missing_language_in_prompt_source_fails_before_loading(tmp_path: Path) -> None:
    source = tmp_path / "en_only.jsonl"
    rows = [{"instruction": f"q{i}", "kind": k, "split": split, "lang": "en"}
            for i in range(3) for k in KINDS for split in ("train", "val", "test")]
    source.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    settings = Settings(model=str(tmp_path / "no-such-model"), out=tmp_path / "o", prompts=str(source))
    with pytest.raises(DataError, match="no harmful prompts for language 'de'"):
        run_crosslingual(settings, CrosslingualOptions.parse("en,de", transfer=False))


def test_cli_prints_the_matrices(tiny_chat: Path, tmp_path: Path) -> None:
    args = ["crosslingual", str(tiny_chat), "--langs", "en,de", "--out", str(tmp_path / "o"), "--layer", "1",
            "--pos", "-1", "--n-train", "2", "--transfer-prompts", "2", "--transfer-max-new-tokens", "2", "--no-plots"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "layer 1, position -1 (--layer/--pos)" in result.output
    assert "cosine similarity" in result.output and "compliance" in result.output
    report = _report(tmp_path / "o")
    assert report["transfer"]["n"] == [[2, 2]] * 3
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_cli_takes_a_recipe(tiny_chat: Path, tmp_path: Path) -> None:
    """`crosslingual --recipe R`: shared settings and the crosslingual section's keys from R, flags override."""
    recipe = tmp_path / "xl.yaml"
    recipe.write_text(
        f"model: {tiny_chat}\nlangs: en,de,fr\nlayer: 1\npos: -1\nn_train: 2\ntransfer_prompts: 3\n"
        "transfer_max_new_tokens: 2\nplots: false\n",
        encoding="utf-8",
    )
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["crosslingual", "--recipe", str(recipe), "--langs", "en,de", "--out", str(out)])
    assert result.exit_code == 0, result.output
    transfer = _report(out)["transfer"]
    assert transfer["columns"] == ["en", "de"]  # the flag won over the recipe's langs
    assert transfer["n_prompts"] == 3 and transfer["max_new_tokens"] == 2 and transfer["n"] == [[3, 3]] * 3
    assert _report(out)["plots"] == []


def test_recipe_max_new_tokens_is_said_not_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A recipe's max_new_tokens (eval's answer cap) does not reach the transfer matrix, and crosslingual says so."""
    from abliterate.settings import CrosslingualSettings, build_command_settings

    recipe = tmp_path / "xl.yaml"
    recipe.write_text(f"model: {tmp_path}\nlangs: en,de\nmax_new_tokens: 7\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="abliterate.settings"):
        _, section = build_command_settings(recipe, {}, CrosslingualSettings)
    assert "max_new_tokens=7, which crosslingual does not use" in caplog.text
    assert "transfer_max_new_tokens" in caplog.text
    assert section.transfer_max_new_tokens == CrosslingualSettings.model_fields["transfer_max_new_tokens"].default


# --- the model organism --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_organism_directions_agree_across_languages(tmp_path: Path) -> None:
    from abliterate.commands.organism.train import build_organism

    folder = build_organism()
    out = tmp_path / "organism"
    # the normal selection on en, restricted to the last position to keep the test short
    settings = Settings(
        model=str(folder), out=out, dtype="float32", device="cpu", n_train=32, n_val=8, screen_prompts=4,
        finalists=3, pos=-1, batch_size=48,
    )
    start = time.perf_counter()
    options = CrosslingualOptions.parse("en,de,fr", transfer_prompts=16, transfer_max_new_tokens=48)
    result = run_crosslingual(settings, options)
    seconds = time.perf_counter() - start
    report = _report(out)
    matrix = report["cosine"]["matrix"]
    transfer = report["transfer"]
    print(f"\ncrosslingual on the organism: {seconds:.0f} s, layer {report['layer']}, pos {report['pos']}")
    print("cosine", json.dumps(matrix), "\ncompliance", json.dumps(transfer["compliance"]))
    print("verdict", transfer["verdict"]["summary"])
    assert result.plots == list(PLOT_FILES.values())
    _check_images(out, result.plots)
    # The organism's refusal is English-centred (docs/organism.md; issue 16 is a multilingual one): measured on
    # the build from the current prompt sets, layer 11, cosine en-fr 0.41, en-de -0.004, de-fr -0.02. So only
    # en-fr is asserted to share a direction; de has a refusal direction of its own.
    assert matrix[0][2] > 0.2 and matrix[2][0] > 0.2
    assert all(abs(matrix[i][i] - 1.0) < 1e-4 for i in range(3))
    baseline = transfer["compliance"][0]
    for i in range(3):
        assert transfer["compliance"][i + 1][i] > baseline[i]  # ablating a language's own direction helps it
    assert not any(math.isnan(v) for row in transfer["compliance"] for v in row)


@pytest.mark.slow
def test_english_organism_says_its_refusal_is_not_shared(tmp_path: Path) -> None:
    """The negative control (issue 16): on the English-centred organism, at the site where the English direction
    removes English refusal (layer 16, last position: the demo's `edit --lang en` picks it, docs/organism.md),
    the other languages' refusal does not go with it, and the command says so in plain words."""
    from abliterate.commands.organism.train import build_organism

    folder = build_organism()
    settings = Settings(model=str(folder), out=tmp_path / "xl", dtype="float32", device="cpu", n_train=32,
                        layer=16, pos=-1, batch_size=48)
    options = CrosslingualOptions.parse("en,de,fr", transfer_prompts=16, transfer_max_new_tokens=48)
    run_crosslingual(settings, options)
    transfer = _report(tmp_path / "xl")["transfer"]
    verdict = transfer["verdict"]
    print("\nnegative control, refusal per cell", json.dumps(transfer["refusal_rate"]), "\n", verdict["summary"])
    english = transfer["rows"].index("en")
    assert transfer["refusal_rate"][english][0] <= 0.25  # the English direction removes English refusal ...
    assert verdict["verdict"] == "not shared"  # ... and the tool says it does not carry over
    assert verdict["summary"].startswith("refusal is NOT shared across languages")
