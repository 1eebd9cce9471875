"""The ``Examples:`` in medseg's docstrings run, and pass: every module of the package is imported and its doctests
executed (a failing example fails here, naming the module). At least ten entry points carry one."""

import doctest
import importlib
import pkgutil

import pytest

import medseg

# modules whose import needs a package outside the test install (torchvision networks), or runs the CLI
OPTIONAL = {"medseg.models.deeplabv3", "medseg.models.smp", "medseg.__main__"}  # __main__ runs the CLI


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(medseg.__path__, "medseg.") if m.name not in OPTIONAL)


@pytest.fixture(scope="module")
def results() -> dict[str, doctest.TestResults]:
    out = {}
    for name in _modules():
        module = importlib.import_module(name)
        out[name] = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                                    report=False)
    return out


def test_every_docstring_example_passes(results: dict[str, doctest.TestResults]):
    failed = {name: r.failed for name, r in results.items() if r.failed}
    assert not failed, f"doctest failures (run python -m doctest -v on the module): {failed}"


def test_at_least_ten_entry_points_carry_examples(results: dict[str, doctest.TestResults]):
    finder = doctest.DocTestFinder()
    documented = sorted(
        test.name for name in results for test in finder.find(importlib.import_module(name)) if test.examples
    )
    assert len(documented) >= 10, documented
    assert sum(r.attempted for r in results.values()) >= 10
