"""Static checks of the 3D Slicer extension: layout, CMake lists, the module's classes, imports and .ui bindings.

These read the files only (no Slicer needed); the logic itself is tested on real MRML in ``tests/slicer``.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

EXTENSION = Path(__file__).resolve().parents[1] / "slicer_extension"
MODULE = EXTENSION / "GeomedShapes"
SOURCE = MODULE / "GeomedShapes.py"


def _tree() -> ast.Module:
    return ast.parse(SOURCE.read_text(encoding="utf-8"), filename=str(SOURCE))


def _classes() -> dict[str, ast.ClassDef]:
    return {node.name: node for node in _tree().body if isinstance(node, ast.ClassDef)}


def _cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [item.replace("${MODULE_NAME}", "GeomedShapes") for item in block.split()]


def test_extension_cmake_has_the_metadata_and_the_module():
    text = (EXTENSION / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable}\s", text), variable
    assert "add_subdirectory(GeomedShapes)" in text and "find_package(Slicer REQUIRED)" in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text


def test_every_script_and_resource_is_listed_in_cmake_and_exists():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    scripts, resources = _cmake_list(text, "MODULE_PYTHON_SCRIPTS"), _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    on_disk_resources = sorted(str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file())
    assert sorted(scripts) == on_disk_scripts
    assert sorted(resources) == on_disk_resources


def test_module_has_the_five_classes_of_a_scripted_module():
    classes = _classes()
    bases = {name: {ast.unparse(base) for base in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases["GeomedShapes"]
    assert "ScriptedLoadableModuleWidget" in bases["GeomedShapesWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["GeomedShapesLogic"]
    assert "ScriptedLoadableModuleTest" in bases["GeomedShapesTest"]
    decorators = {ast.unparse(d) for d in classes["GeomedShapesParameterNode"].decorator_list}
    assert decorators == {"parameterNodeWrapper"}


def test_module_imports_no_heavy_dependency_when_it_opens():
    """torch, pykeops and geomed load on first Apply (inside functions), never at module import."""
    top_level = set()
    for node in _tree().body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert not top_level & {"torch", "pykeops", "geomed", "GeomedShapesLib", "numpy"}


def test_widget_holds_no_computation():
    """The widget's methods call the logic; none of them imports geomed or does arithmetic on arrays."""
    widget = _classes()["GeomedShapesWidget"]
    source = ast.unparse(widget)
    assert "geomed" not in source and "numpy" not in source and "register(" not in source
    assert "self.logic.process(" in source and "tryWithErrorDisplay" in source


def test_ui_parses_and_every_parameter_binding_is_a_parameter_node_field():
    fields = {node.target.id for node in _classes()["GeomedShapesParameterNode"].body
              if isinstance(node, ast.AnnAssign)}
    root = ElementTree.parse(MODULE / "Resources" / "UI" / "GeomedShapes.ui").getroot()
    bound = [prop.find("string").text for prop in root.iter("property") if prop.get("name") == "SlicerParameterName"]
    assert bound and set(bound) <= fields
    # every field has its widget: bound in the .ui, or (the segment pickers, which the wrapper cannot bind) written
    # by the widget when the picker changes
    widget = ast.unparse(_classes()["GeomedShapesWidget"])
    written = set(re.findall(r"self\._parameterNode\.(\w+) = ", widget))
    assert written == {"fixedSegment", "movingSegment"}
    assert set(bound) | written == fields
    names = {widget.get("name") for widget in root.iter("widget")}
    source = SOURCE.read_text()
    for used in set(re.findall(r"self\.ui\.(\w+)", source)):
        assert used in names, used


# The widget classes slicer.parameterNodeWrapper can bind, and the field types each represents, as its
# guiConnectors module registers them (it matches the exact widget class: a ctkDoubleSpinBox, say, has no
# connector, and connectGui would fail when the module opens). "node" is a vtkMRML node class or a Union of them;
# a QComboBox needs a Choice annotation.
_CONNECTORS = {
    "QCheckBox": {"bool"}, "QPushButton": {"bool"}, "QSpinBox": {"int"}, "QSlider": {"int"},
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "QComboBox": {"str", "int", "float", "bool"},
    "QLineEdit": {"str"}, "QTextEdit": {"str"}, "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"}, "qMRMLSubjectHierarchyTreeView": {"node"},
}


def _field_type(annotation: ast.expr) -> tuple[str, bool]:
    """(the field's base type, whether it has a Choice annotation), from its annotation in the module source."""
    choice = False
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        first, *extras = annotation.slice.elts
        choice = any(ast.unparse(extra).startswith("Choice(") for extra in extras)
        annotation = first
    text = ast.unparse(annotation)
    names = re.findall(r"vtkMRML\w+", text)
    if names and (text in names or text.startswith("Union[")):
        return "node", choice
    return text, choice


def test_every_bound_widget_has_a_parameter_node_connector_for_its_field():
    fields = {node.target.id: _field_type(node.annotation) for node in _classes()["GeomedShapesParameterNode"].body
              if isinstance(node, ast.AnnAssign)}
    root = ElementTree.parse(MODULE / "Resources" / "UI" / "GeomedShapes.ui").getroot()
    for widget in root.iter("widget"):
        bound = [prop.findtext("string") for prop in widget.findall("property")
                 if prop.get("name") == "SlicerParameterName"]
        if not bound:
            continue
        kind, choice = fields[bound[0]]
        assert kind in _CONNECTORS.get(widget.get("class"), set()), (widget.get("name"), widget.get("class"), kind)
        if widget.get("class") == "QComboBox":
            assert choice, f"{bound[0]} is shown in a QComboBox: it needs a Choice annotation"


def test_segmentation_inputs_have_segment_pickers_wired_to_the_parameter_node():
    root = ElementTree.parse(MODULE / "Resources" / "UI" / "GeomedShapes.ui").getroot()
    pickers = {widget.get("name") for widget in root.iter("widget")
               if widget.get("class") == "qMRMLSegmentSelectorWidget"}
    assert pickers == {"fixedSegmentSelector", "movingSegmentSelector"}
    scene_receivers = {connection.findtext("receiver") for connection in root.iter("connection")
                       if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert pickers <= scene_receivers
    methods = {node.name for node in _classes()["GeomedShapesWidget"].body if isinstance(node, ast.FunctionDef)}
    for picker, handler in re.findall(r'self\.ui\.(\w+)\.connect\("[^"]+", self\.(\w+)\)', SOURCE.read_text()):
        assert handler in methods, (picker, handler)
    source = SOURCE.read_text()
    assert 'fixedSegmentSelector.connect("currentSegmentChanged(QString)"' in source
    assert 'movingSegmentSelector.connect("currentSegmentChanged(QString)"' in source


def test_dependencies_are_installed_on_apply_after_asking_never_at_open():
    classes = _classes()
    ensure = next(node for node in classes["GeomedShapesLogic"].body
                  if isinstance(node, ast.FunctionDef) and node.name == "ensureDependencies")
    source = ast.unparse(ensure)
    assert "pip_ensure(" in source and "skip_packages=['torch']" in source
    assert "prompt_install=True" in source and "except RuntimeError" in source  # asks; declining is not an error
    widget = ast.unparse(classes["GeomedShapesWidget"])
    setup = ast.unparse(next(node for node in classes["GeomedShapesWidget"].body
                             if isinstance(node, ast.FunctionDef) and node.name == "setup"))
    assert "ensureDependencies" not in setup and widget.count("ensureDependencies()") == 3


def test_requirements_leave_torch_to_the_pytorch_extension():
    lines = [line.strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and not any(re.match(r"torch\b", line) for line in lines)
    assert any(line.startswith("geomed") for line in lines)


def test_logic_library_imports_without_slicer(monkeypatch):
    monkeypatch.syspath_prepend(str(MODULE))
    for name in [name for name in sys.modules if name.startswith("GeomedShapesLib")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    logic = importlib.import_module("GeomedShapesLib.logic")
    assert callable(logic.register_nodes) and callable(logic.longitudinal_nodes)
    for path in (MODULE / "GeomedShapesLib").glob("*.py"):
        assert not re.search(r"^\s*(import|from) (slicer|qt|ctk)\b", path.read_text(), re.M), path


def test_the_module_offers_the_presets_models_and_losses_of_geomed():
    """The widget lists them itself — it opens before geomed is installed (Apply installs it, after asking), so
    its parameter node's choices cannot come from an import —; they must be geomed's public lists, which the logic
    library uses."""
    from geomed.registration import LOSSES, MODELS, PRESETS

    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in _tree().body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id in {"PRESETS", "MODELS", "LOSSES"}}
    assert set(constants["PRESETS"]) == set(PRESETS)
    assert tuple(constants["MODELS"]) == tuple(MODELS)
    assert tuple(constants["LOSSES"]) == tuple(LOSSES)
