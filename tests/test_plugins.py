"""Third-party adapters: a package installed with a `halp.adapters` entry point serves its model_type.

The plugins live in a throwaway distribution that the test builds from a pyproject (the layout
docs/models.md shows) and pip-installs into a target directory put on sys.path, so the registry reads
the same installed metadata (`*.dist-info/entry_points.txt`) as for a real `pip install`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from halp.capture import FeatureExtractor
from halp.data import load_image, read_samples
from halp.errors import HalpError
from halp.models import AdapterPluginError, adapter_class_for, adapter_classes, adapter_for
from halp.models.generic import GenericAdapter

PACKAGE = "halp_toy_plugins"

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "halp-toy-plugins"
version = "0.1"

[project.entry-points."halp.adapters"]
mistral3 = "{PACKAGE}.mistral3:Mistral3Adapter"
toy_broken = "{PACKAGE}.broken:ToyAdapter"
toy_not_adapter = "{PACKAGE}.mistral3:NOT_AN_ADAPTER"
toy_mismatch = "{PACKAGE}.mistral3:Mistral3Adapter"
qwen2_vl = "{PACKAGE}.mistral3:Mistral3Adapter"
"""

# The worked example of docs/models.md: a dedicated adapter for a family halp serves only generically.
ADAPTER = """
from halp.models import Adapter


class Mistral3Adapter(Adapter):
    model_types = ("mistral3",)
    projector = "model.multi_modal_projector"
    decoder_layers = "model.language_model.layers"
    final_norm = "model.language_model.norm"
    image_token_id_attr = "image_token_index"
    notes = "Pixtral tower, 2x2 patch merger; image placeholder [IMG]"


NOT_AN_ADAPTER = "a string"
"""

BROKEN = """
import a_module_that_is_not_installed  # noqa: F401

class ToyAdapter:
    pass
"""


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """The toy distribution pip-installed into a target directory (not on sys.path yet)."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "source"
    package = source / "src" / PACKAGE
    package.mkdir(parents=True)
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (package / "__init__.py").write_text("")
    (package / "mistral3.py").write_text(ADAPTER)
    (package / "broken.py").write_text(BROKEN)
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*pip, "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "halp_toy_plugins-0.1.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def plugins(installed_plugins, monkeypatch):
    """The toy distribution importable for one test; afterwards off sys.path and its modules forgotten."""
    monkeypatch.syspath_prepend(str(installed_plugins))
    yield installed_plugins
    for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_an_installed_plugin_serves_its_model_type_end_to_end(plugins, loaded, vqa_set):
    assert f"{PACKAGE}.broken" not in sys.modules
    plugin_class = adapter_class_for("mistral3")
    assert plugin_class.__module__ == f"{PACKAGE}.mistral3" and plugin_class.__name__ == "Mistral3Adapter"
    assert f"{PACKAGE}.broken" not in sys.modules, "a plugin is imported only when its model_type is asked for"

    model, processor = loaded("mistral3")
    adapter = adapter_for(model, processor)
    assert type(adapter) is plugin_class and not isinstance(adapter, GenericAdapter)
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids("[IMG]")
    # Same module paths as the generic adapter resolves for mistral3: the same numbers, through the plugin.
    table, images_dir = vqa_set
    samples = read_samples(table)[:2]
    images = [load_image(images_dir, sample.image_id) for sample in samples]
    questions = [sample.question for sample in samples]
    layers = [0, adapter.num_layers - 1]
    ours = FeatureExtractor(adapter, layers)(images, questions, max_new_tokens=0)
    generic = FeatureExtractor(GenericAdapter(model, processor), layers)(images, questions, max_new_tokens=0)
    assert ours.features.keys() == generic.features.keys() and "vision_only" in ours.features
    for name, value in generic.features.items():
        np.testing.assert_allclose(ours.features[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_broken_plugin_fails_with_its_name_and_no_other_family_is_affected(plugins):
    with pytest.raises(AdapterPluginError) as broken:
        adapter_class_for("toy_broken")
    message = str(broken.value)
    assert isinstance(broken.value, HalpError) and isinstance(broken.value, ImportError)
    assert "'toy_broken'" in message and "halp-toy-plugins 0.1" in message
    assert "a_module_that_is_not_installed" in message

    with pytest.raises(AdapterPluginError, match=r"'toy_not_adapter' .* not a subclass of halp.models.Adapter"):
        adapter_class_for("toy_not_adapter")
    with pytest.raises(AdapterPluginError, match=r"'toy_mismatch'.*model_types is \('mistral3',\)"):
        adapter_class_for("toy_mismatch")
    with pytest.raises(AdapterPluginError, match=r"'qwen2_vl'.*halp's own QwenVLAdapter serves"):
        adapter_class_for("qwen2_vl")

    # Families the plugins do not name resolve as before, broken plugins installed or not.
    assert adapter_class_for("llava").__module__ == "halp.models.llava"
    assert adapter_class_for("some_unknown_vlm") is GenericAdapter
    # Listing every family imports every plugin, in name order: the first unusable one is named.
    with pytest.raises(AdapterPluginError, match="adapter plugin 'qwen2_vl'"):
        adapter_classes()


def test_without_plugins_the_registry_is_halps_own():
    assert "toy_broken" not in adapter_classes()
    assert adapter_class_for("mistral3") is GenericAdapter
