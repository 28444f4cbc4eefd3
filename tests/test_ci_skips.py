"""In CI a missing dev dependency fails the run; outside CI it skips (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
MISSING = """
import pytest

def test_in_a_function():
    pytest.importorskip("no_such_dev_dependency")
"""
MISSING_AT_MODULE_LEVEL = """
import pytest

pytest.importorskip("no_such_dev_dependency")

def test_never_collected():
    pass
"""


@pytest.mark.parametrize("source", [MISSING, MISSING_AT_MODULE_LEVEL], ids=["test", "module"])
@pytest.mark.parametrize("ci", ["true", ""], ids=["ci", "local"])
def test_missing_dependency_fails_in_ci_and_skips_elsewhere(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_missing=source)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    if ci:
        assert result.ret != 0
        result.stdout.fnmatch_lines(["*CI=true: a dev dependency is missing*"])
    else:
        result.assert_outcomes(skipped=1)
