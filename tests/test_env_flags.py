"""The one parsing rule for the environment flags (grpo_kernels/env_flags.py)."""

import pytest

from grpo_kernels import env_flags


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), (" ON ", True), ("Yes", True), ("0", False),
                                       ("", False), ("no", False), ("2", False)])
def test_default_off_flags_are_on_only_for_a_yes(monkeypatch, value, on):
    for name, read in (("TRITON_INTERPRET", env_flags.triton_interpret), ("GRPO_KERNELS_DEBUG", env_flags.debug)):
        monkeypatch.setenv(name, value)
        assert read() is on
        monkeypatch.delenv(name)
        assert read() is False


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), (" OFF", False), ("No", False), ("1", True),
                                       ("", True), ("anything", True)])
def test_native_switch_is_off_only_for_a_no(monkeypatch, value, on):
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", value)
    assert env_flags.native_enabled() is on
    monkeypatch.delenv("GRPO_KERNELS_NATIVE")
    assert env_flags.native_enabled() is True


def test_env_flags_is_a_leaf():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(env_flags))
    imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.Import) or n.level == 0 and n.module == "__future__" for n in imported)
    assert {a.name for n in imported if isinstance(n, ast.Import) for a in n.names} == {"os"}
