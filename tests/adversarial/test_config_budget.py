"""Class 2: a hostile config file cannot exhaust memory or end as INTERNAL_ERROR: "billion laughs" aliases,
deep nesting, recursive aliases, binary files, huge files and random text are refused with coded errors before
anything is expanded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from adversarial_helpers import assert_coded, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from medseg.config import load_config
from medseg.errors import MedsegError


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _code(path: Path, *overrides: str) -> str:
    with pytest.raises(MedsegError) as info:
        load_config(path, overrides)
    return info.value.code


def test_billion_laughs_is_refused_before_expansion_within_a_memory_limit(tmp_path: Path):
    """9 aliases over 9 levels (387 million strings once expanded) under a 1.5 GB address-space limit: refused in
    well under a second; an expanding parser would die of MemoryError or run for minutes."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    script = textwrap.dedent(f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))
        from medseg.config import load_config
        from medseg.errors import MedsegError
        start = time.perf_counter()
        try:
            load_config({str(bomb)!r})
        except MedsegError as exc:
            print(exc.code, round(time.perf_counter() - start, 3))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    code, seconds = done.stdout.split()
    assert code == "CONFIG_TOO_COMPLEX" and float(seconds) < 2.0, done.stderr[-2000:]


def test_nested_recursive_binary_and_huge_configs_are_refused_with_codes(tmp_path: Path, cli):
    cases = {
        "deep.yaml": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "CONFIG_TOO_COMPLEX"),
        "deep_map.yaml": ("".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n", "CONFIG_TOO_COMPLEX"),
        "recursive.yaml": ("a: &x [1, *x]\n", "CONFIG_TOO_COMPLEX"),
        "binary.yaml": (bytes(range(256)) * 8, "CONFIG_YAML_INVALID"),
        "huge.yaml": ("train:\n  epochs: 1\n# " + "x" * (2 << 20) + "\n", "CONFIG_TOO_COMPLEX"),
        "list.yaml": ("- 1\n- 2\n", "CONFIG_YAML_INVALID"),
        "python.yaml": ("seed: !!python/object/apply:os.system ['echo pwned']\n", "CONFIG_YAML_INVALID"),
    }
    for name, (content, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        assert _code(path) == code, name
        assert_coded(cli("train", "-c", path, "-o", tmp_path / f"run_{name}"), code)
    assert not any(p.name.startswith("run_") for p in tmp_path.iterdir())  # nothing of a run was written


def test_a_bomb_in_a_set_override_is_refused(tmp_path: Path):
    start = time.perf_counter()
    value = "[" * 3000 + "]" * 3000
    assert _code(None, f"model.channels={value}") == "CONFIG_TOO_COMPLEX"
    assert time.perf_counter() - start < 2.0


def test_aliases_within_the_budget_still_work(tmp_path: Path):
    path = tmp_path / "anchors.yaml"
    path.write_text("train: &t {epochs: 3}\ninference: {tta: false}\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 3 and cfg.inference.tta is False


@fuzz_settings(150)
@given(data=st.one_of(st.binary(max_size=400),
                      st.text(alphabet=st.sampled_from(list("{}[]:-&*!|>'\"#,? \n\tab01.%@`")), max_size=300)))
def test_random_config_text_gives_a_config_error_or_a_config(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        load_config(path)
    except MedsegError as exc:
        assert exc.code.startswith("CONFIG_") or exc.code in ("PATH_NOT_FOUND", "INPUT_UNREADABLE"), exc.code
