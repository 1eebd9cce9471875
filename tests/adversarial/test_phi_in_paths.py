"""Class 1: a patient's name in a *folder name* (PACS exports: ``DOE^JANE_19010203/``) must not reach any output,
console line or report through a third-party library's error text (nibabel, SimpleITK and Pillow put whole paths
into their messages)."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import numpy as np
from adversarial_helpers import CANARIES, PATIENT_FOLDER, fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st
from leak_scan import leaks


def _hostile_folder(root: Path, good: Path) -> Path:
    """A PACS-export-like folder: one good case and one broken file of every readable kind."""
    folder = root / "exports" / PATIENT_FOLDER
    folder.mkdir(parents=True)
    shutil.copy(good, folder / "good.nii.gz")
    (folder / "truncated.nii.gz").write_bytes(good.read_bytes()[:300])
    (folder / "garbage_nii.nii").write_bytes(b"not a nifti" * 40)
    (folder / "garbage_nrrd.nrrd").write_bytes(b"NRRD0004\ntype: what\n\n")
    (folder / "garbage_png.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "noaccess.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nElementDataFile = nowhere.raw\n")
    os.symlink(folder / "gone" / "scan.nii.gz", folder / "dangling.nii.gz")
    return folder


def test_no_patient_folder_name_in_predict_report_convert_or_evaluate(tmp_path: Path, cli, smoke_model: Path,
                                                                        tiny_dataset: Path):
    good = tiny_dataset / "imagesTs" / "ct_003.nii.gz"
    folder = _hostile_folder(tmp_path, good)
    out = tmp_path / "out"
    texts = []
    pred = cli("predict", "-i", folder, "-o", out / "pred", "-m", smoke_model, "--stats", "--preview", "--no-tta")
    texts.append(pred.out + pred.err)
    assert pred.code == 1, pred.err  # the good case written, the broken ones recorded as failed
    report = cli("report", out / "pred")
    texts.append(report.out + report.err)
    assert report.code == 0 and (out / "pred" / "review.html").is_file(), report.err
    for broken in ("truncated.nii.gz", "garbage_nrrd.nrrd", "garbage_png.png", "dangling.nii.gz"):
        conv = cli("convert", "-i", folder / broken, "-o", out / "conv" / f"{broken}.nii.gz")
        texts.append(conv.out + conv.err)
        assert (conv.code, "failed:" in conv.err) == (1, True) or "INPUT_UNREADABLE" in conv.err, conv.err
    # a reference folder of the same name, with a broken reference: evaluation refuses it by its code
    refs = tmp_path / "refs" / PATIENT_FOLDER
    refs.mkdir(parents=True)
    (refs / "good.nii.gz").write_bytes(good.read_bytes()[:300])
    ev = cli("evaluate", "-p", out / "pred", "-r", refs, "-o", out / "eval")
    texts.append(ev.out + ev.err)
    assert ev.code == 2 and "NIFTI_CORRUPT" in ev.err, ev.err

    found = leaks(out, CANARIES, texts)
    assert found == [], found
    manifest = (out / "pred" / "manifest.json").read_text()
    assert "truncated.nii.gz" in manifest and "INPUT_UNREADABLE" in manifest  # named relative to the input folder


def test_recorded_errors_keep_names_relative_to_the_input_folder(tmp_path: Path, smoke_model: Path, tiny_dataset: Path):
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_folder

    folder = _hostile_folder(tmp_path, tiny_dataset / "imagesTs" / "ct_003.nii.gz")
    results = predict_folder(Predictor.from_model_dir(smoke_model, "cpu"), folder, tmp_path / "out")
    failed = {r.case_id: r.error for r in results if r.status == "failed"}
    assert set(failed) == {"truncated", "garbage_nii", "garbage_nrrd", "garbage_png", "dangling", "noaccess"}, failed
    for error in failed.values():
        assert str(tmp_path) not in error and PATIENT_FOLDER not in error, error


FOLDER_NAME = st.text(alphabet=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij^_- .0123456789éÖ"), min_size=3,
                      max_size=14).filter(lambda t: t.strip(" .") == t and t not in (".", ".."))


@fuzz_settings(80)
@given(folders=st.lists(FOLDER_NAME, min_size=1, max_size=4),
       name=st.from_regex(r"[a-z0-9_]{1,10}\.(nii\.gz|nrrd|png|dcm)", fullmatch=True),
       style=st.sampled_from(["'{}'", '"{}"', "{}", "file {}: bad", "[Errno 2] No such file: '{}'"]),
       absolute=st.booleans())
def test_no_folder_of_a_path_survives_scrubbing(folders, name, style, absolute):
    """Whatever a path's folders are called (spaces, carets, accents), and however a library quotes it, only the
    file name remains once the input folder is known (the runner always knows it)."""
    from medseg.errors import describe, scrub_paths

    assume(all(folder not in style and folder not in name for folder in folders))
    root = ("/" if absolute else "") + "/".join(["data", *folders])
    message = style.format(f"{root}/{name}")
    shown = scrub_paths(message, roots=[root])
    assert name in shown, (message, shown)
    for folder in folders:
        assert folder not in shown.replace(name, ""), (message, shown)
    assert describe(FileNotFoundError(2, "No such file or directory", f"{root}/{name}"), roots=[root]).endswith(f"'{name}'")


MEDSEG = Path(__file__).resolve().parents[2] / "medseg"


def _formatted_exceptions(tree: ast.AST) -> list[tuple[int, str]]:
    """Places where a caught exception is turned into text for a message: ``f"...{exc}"``, ``f"...{str(exc)}"``
    or ``"..." + str(exc)`` (matching on its text, ``"x" in str(exc)``, records nothing and is allowed)."""
    caught = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}

    def is_text_of_caught(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in caught
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("str", "repr")
                and len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id in caught)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FormattedValue) and is_text_of_caught(node.value):
            found.append((node.lineno, ast.unparse(node.value)))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            found += [(node.lineno, ast.unparse(side)) for side in (node.left, node.right)
                      if isinstance(side, ast.Call) and is_text_of_caught(side)]
    return found


def test_third_party_exception_text_enters_records_only_through_describe():
    """The one door: nowhere in medseg is a caught exception formatted into a message except through
    :func:`medseg.errors.describe` (which scrubs paths), so no new error path can bypass the scrubbing."""
    offenders = [f"{path.relative_to(MEDSEG.parent)}:{line} formats {what}"
                 for path in sorted(MEDSEG.rglob("*.py")) if path.name != "errors.py"
                 for line, what in _formatted_exceptions(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == [], offenders


def test_the_guard_finds_a_formatted_exception():
    planted = ast.parse("try:\n    pass\nexcept OSError as exc:\n    raise ValueError(f'cannot read: {exc}')\n"
                        "try:\n    pass\nexcept OSError as err:\n    m = 'no: ' + str(err)\n    ok = 'x' in str(err)\n")
    assert sorted(what for _, what in _formatted_exceptions(planted)) == ["exc", "str(err)"]


def test_the_scrubber_is_not_blind():
    """The checks above can fail: an unscrubbed message with the folder is caught."""
    from medseg.errors import scrub_paths

    message = f"Cannot work out file type of \"/srv/{PATIENT_FOLDER}/x.nii\""
    assert leaks(Path(__file__).parent / "__nothing__", CANARIES, [message])
    assert PATIENT_FOLDER not in scrub_paths(message) and "x.nii" in scrub_paths(message)
    assert np.all([c not in scrub_paths(message).lower() for c in CANARIES])
