import pytest

from allspark.registry import Registry, RegistryError


def test_register_get_and_list():
    reg = Registry("things", entry_point_group="allspark.test-none")

    @reg.register("alpha")
    class Alpha:
        def __init__(self, x: int = 1):
            self.x = x

    reg.register("beta", obj=lambda: "b")
    assert reg.get("alpha") is Alpha
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("a*") == ["alpha"]
    assert "alpha" in reg and "gamma" not in reg
    assert reg.build({"type": "alpha", "x": 3}).x == 3
    assert reg.build("alpha").x == 1


def test_duplicate_refused_unless_forced():
    reg = Registry("things", entry_point_group="allspark.test-none")
    reg.register("a", obj=int)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", obj=float)
    reg.register("a", obj=float, force=True)
    assert reg.get("a") is float


def test_missing_name_lists_available_and_close_matches():
    reg = Registry("encoders", entry_point_group="allspark.test-none")
    reg.register("hsi_spectral", obj=int)
    reg.register("video_tube", obj=int)
    with pytest.raises(RegistryError) as err:
        reg.get("hsi_spectrl")
    msg = str(err.value)
    assert "hsi_spectral" in msg and "video_tube" in msg and "did you mean" in msg


def test_build_rejects_unknown_arguments_and_passes_optional_ones():
    reg = Registry("heads", entry_point_group="allspark.test-none")

    @reg.register("h")
    def make(hidden_size: int, info=None):
        return hidden_size, info

    @reg.register("plain")
    def make_plain(hidden_size: int):
        return hidden_size

    assert reg.build("h", hidden_size=3, optional={"info": {"a": 1}}) == (3, {"a": 1})
    assert reg.build("plain", hidden_size=3, optional={"info": {"a": 1}}) == 3
    with pytest.raises(ValueError, match="does not take argument"):
        reg.build({"type": "plain", "depth": 2}, hidden_size=3)
    with pytest.raises(ValueError, match="'type'"):
        reg.build({"x": 1})
