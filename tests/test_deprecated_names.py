"""Renamed modules and functions keep working under their former names, with a DeprecationWarning."""
import importlib
import sys

import pytest
import torch
from torch import nn

import hass_ext
from hass_ext import oracles
from hass_ext.ops.small_linear import SmallLinear, use_small_linear


def _fresh_import(name: str):
    """Import ``name`` as if for the first time (a module warns once, when it is first imported)."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if hasattr(sys.modules[parent], child):
        delattr(sys.modules[parent], child)
    return importlib.import_module(name)


def test_use_small_batch_linear_is_use_small_linear():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(DeprecationWarning, match="use hass_ext.use_small_linear"):
        assert hass_ext.use_small_batch_linear(model, exact_bf16=True) == 2
    assert all(type(m) is SmallLinear and m.exact_bf16 for m in (model[0], model[2]))
    assert hass_ext.use_blas_linear(model) == 2 and hass_ext.use_small_linear(model) == 2


def test_small_batch_linear_class_is_small_linear():
    with pytest.warns(DeprecationWarning, match="SmallBatchLinear is deprecated: use hass_ext.SmallLinear"):
        from hass_ext.ops.small_linear import SmallBatchLinear
    assert SmallBatchLinear is SmallLinear is hass_ext.SmallLinear
    with pytest.raises(ImportError, match="cannot import name 'NoSuchLinear'"):
        from hass_ext.ops.small_linear import NoSuchLinear  # noqa: F401


def test_cpu_linear_module():
    with pytest.warns(DeprecationWarning, match="hass_ext.cpu_linear is deprecated"):
        cpu_linear = _fresh_import("hass_ext.cpu_linear")
    assert cpu_linear.SmallBatchLinear is SmallLinear and cpu_linear.use_blas_linear is hass_ext.use_blas_linear
    lin = nn.Linear(3, 2)
    with pytest.warns(DeprecationWarning):
        assert cpu_linear.use_small_batch_linear(lin) == 1
    assert type(lin) is cpu_linear.SmallBatchLinear
    x = torch.randn(2, 3)
    with torch.no_grad():
        want = hass_ext.ops.small_linear(x, lin.weight, lin.bias)
        assert torch.equal(cpu_linear.linear(x, lin.weight, lin.bias), want)


def test_reference_module_is_oracles():
    with pytest.warns(DeprecationWarning, match="hass_ext.reference is deprecated: use hass_ext.oracles"):
        reference = _fresh_import("hass_ext.reference")
    assert reference.compact_kv_reference is oracles.compact_kv_oracle
    assert reference.verify_tree_reference is oracles.verify_tree_oracle
    assert reference.reference_tree_attention is oracles.tree_attention_oracle
    assert reference.reference_align_attention is oracles.align_attention_oracle
    assert reference.distill_loss_reference is oracles.distill_loss_oracle
    assert reference.fused_linear_distill_loss_reference is oracles.fused_linear_distill_loss_oracle
    assert reference.hass_compute_loss_reference is oracles.hass_compute_loss_reference


def test_attention_module_is_hf_attention():
    from hass_ext import hf_attention

    with pytest.warns(DeprecationWarning, match="hass_ext.attention is deprecated"):
        attention = _fresh_import("hass_ext.attention")
    assert attention.register_hass_tree is hass_ext.register_hass_tree is hf_attention.register_hass_tree
    assert attention.NAME == hf_attention.ATTN_IMPLEMENTATION == "hass_tree"


def test_importing_the_package_warns_about_nothing():
    import subprocess

    code = "import warnings; warnings.simplefilter('error'); import hass_ext, hass_ext.oracles, hass_ext.speed_eval"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=hass_ext.__path__[0] + "/..")


def test_ops_keeps_every_name_it_exported():
    # what hass_ext.ops offered as one module, before it became a package of one module per op
    former = ["compact_kv", "verify_tree", "tree_attention", "MAX_TREE_NODES", "align_attention", "distill_loss",
              "DEFAULT_VOCAB_CHUNK", "DistillTargetStats", "distill_target_stats", "fused_linear_distill_loss",
              "wants_grad", "small_linear"]
    assert [n for n in former if not hasattr(hass_ext.ops, n)] == []
    assert all(callable(getattr(hass_ext.ops, n)) for n in former if not n.isupper())
    assert set(former) <= set(hass_ext.ops.__all__)
    from hass_ext.ops import wants_grad  # noqa: F401  (the form other modules use)


@pytest.mark.parametrize("name", ["attention", "cpu_linear"])
def test_former_submodules_are_still_attributes_of_the_package(name):
    # `import hass_ext` used to load hass_ext.attention and hass_ext.cpu_linear: hass_ext.<name> still works
    sys.modules.pop(f"hass_ext.{name}", None)
    hass_ext.__dict__.pop(name, None)
    with pytest.warns(DeprecationWarning, match=f"hass_ext.{name} is deprecated"):
        module = getattr(hass_ext, name)
    assert module is sys.modules[f"hass_ext.{name}"]
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        hass_ext.no_such_module
