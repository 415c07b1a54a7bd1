"""GeomedShapes: register and measure brain, knee and heart shapes in 3D Slicer with geomed.

Widget (GUI state and events only) over a logic that converts MRML nodes and calls geomed
(``GeomedShapesLib.logic``, tested outside Slicer). geomed, and torch from the PyTorch extension, are imported on
first Apply, never when the module opens. (No ``from __future__ import annotations`` here: the parameter-node
wrapper reads the annotations as objects.)
"""

import contextlib
from pathlib import Path
from typing import Annotated, Union

import slicer
import vtk
from slicer import vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, Maximum, Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PRESETS = ("brain", "knee", "heart")
MODELS = ("rigid", "similarity", "affine", "deformable", "diffeomorphic")
LOSSES = ("sinkhorn", "kernel", "varifold")


class GeomedShapes(ScriptedLoadableModule):
    """Module metadata (shown in Slicer's module list and help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Geomed Shapes")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Shape Analysis")]
        self.parent.dependencies = []
        self.parent.contributors = ["geomed developers"]
        self.parent.helpText = _(
            "Register a moving shape onto a fixed one (models, labelmaps or segments; rigid to diffeomorphic) with "
            "optimal-transport (Sinkhorn) losses in millimetres, and measure volumes and their change over time. "
            "Outputs are new nodes: a transform, the warped model coloured by its normal displacement, and a table "
            "of quality metrics. See the geomed README, section '3D Slicer extension'.")
        self.parent.acknowledgementText = _(
            "geomed builds on PyTorch, KeOps, VTK, SimpleITK and MONAI. Demo anatomy: Allen Human Brain Atlas "
            "(CC BY 4.0), mskt knees (MIT), Rodero et al. 2021 hearts (CC BY 4.0).")


@parameterNodeWrapper
class GeomedShapesParameterNode:
    """The module's state, saved with the scene.

    fixedNode, movingNode - what to register (model, labelmap, volume or segmentation nodes)
    fixedSegment, movingSegment - the segment id picked in a segmentation input (kept in step with the segment
        pickers by the widget: the wrapper has no connector for qMRMLSegmentSelectorWidget)
    label - label value to take from labelmap inputs (0: every non-zero voxel)
    preset - anatomy scales (brain, knee, heart)
    model - transform model
    loss - what the deformable stages minimise: Sinkhorn divergence, Gaussian-kernel MMD or varifold distance
    blur - the Sinkhorn blur or the kernel width in mm (0: the preset's finest blur)
    reach - the Sinkhorn reach in mm (0: the preset's)
    useGPU - run on CUDA when available
    plot - also plot the surface distances before and after
    timepointSegment - the segment name to take from segmentation timepoints (longitudinal)
    exportFolder - where Export writes the last outputs
    """

    fixedNode: Union[vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode]  # noqa: UP007 (typing.Union)
    movingNode: Union[vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode]  # noqa: UP007
    fixedSegment: str
    movingSegment: str
    label: Annotated[int, Minimum(0), Default(0)]
    preset: Annotated[str, Choice(list(PRESETS)), Default("brain")]
    model: Annotated[str, Choice(list(MODELS)), Default("rigid")]
    loss: Annotated[str, Choice(list(LOSSES)), Default("sinkhorn")]
    blur: Annotated[float, Minimum(0.0), Maximum(100.0), Default(0.0)]
    reach: Annotated[float, Minimum(0.0), Maximum(1000.0), Default(0.0)]
    useGPU: Annotated[bool, Default(False)]
    plot: Annotated[bool, Default(False)]
    timepointSegment: str
    exportFolder: Path


class GeomedShapesWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: node and segment pickers, preset, model, loss, Preview / Apply / Cancel, progress, export.

    No computation here: every action calls the logic, inside ``tryWithErrorDisplay``.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelled = False
        self._outputNodes = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GeomedShapes.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GeomedShapesLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.longitudinalButton.connect("clicked(bool)", self.onLongitudinalButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.fixedSegmentSelector.connect("currentSegmentChanged(QString)", self.onFixedSegmentChanged)
        self.ui.movingSegmentSelector.connect("currentSegmentChanged(QString)", self.onMovingSegmentChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._setOutputs([])

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._showSegmentPickers()
        self.ui.reachSpinBox.enabled = self._parameterNode.loss == "sinkhorn"
        ready = bool(self._parameterNode and self._parameterNode.fixedNode and self._parameterNode.movingNode)
        self.ui.applyButton.enabled = self.ui.previewButton.enabled = ready
        self.ui.applyButton.toolTip = _("Register the moving shape onto the fixed one") if ready else _(
            "Select fixed and moving shapes")

    def _showSegmentPickers(self) -> None:
        """A segment picker under each input that is a segmentation, showing the segment stored in the scene."""
        parameters = self._parameterNode
        for node, segmentId, picker, label in (
                (parameters.fixedNode, parameters.fixedSegment, self.ui.fixedSegmentSelector,
                 self.ui.fixedSegmentLabel),
                (parameters.movingNode, parameters.movingSegment, self.ui.movingSegmentSelector,
                 self.ui.movingSegmentLabel)):
            segmentation = node if node is not None and node.IsA("vtkMRMLSegmentationNode") else None
            picker.visible = label.visible = segmentation is not None
            if picker.currentNode() != segmentation:
                picker.setCurrentNode(segmentation)
            if segmentation is not None and segmentId and picker.currentSegmentID() != segmentId:
                picker.setCurrentSegmentID(segmentId)

    def onFixedSegmentChanged(self, segmentId: str) -> None:
        if self._parameterNode:
            self._parameterNode.fixedSegment = segmentId or ""

    def onMovingSegmentChanged(self, segmentId: str) -> None:
        if self._parameterNode:
            self._parameterNode.movingSegment = segmentId or ""

    def onPreviewButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Preview failed."), waitCursor=True):
            if self.logic.ensureDependencies():
                self.logic.preview(self._parameterNode)

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._running(True)
            try:
                outputs = self.logic.process(self._parameterNode, progress=self._progress, cancel=self._cancel)
                if outputs is None:
                    slicer.util.showStatusMessage(_("Registration cancelled: no node was added"), 5000)
                    return
                self.ui.backendLabel.text = outputs.result.backend
                self.ui.qualityTable.setMRMLTableNode(outputs.table)
                self._setOutputs(outputs.nodes())
                if outputs.plot is not None:
                    slicer.modules.plots.logic().ShowChartInLayout(outputs.plot)
            finally:
                self._running(False)

    def onLongitudinalButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Longitudinal measurement failed."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._running(True)
            try:
                outputs = self.logic.longitudinal(self._parameterNode, self.ui.timepointsSelector.checkedNodes(),
                                                  self.ui.yearsEdit.text, progress=self._progress,
                                                  cancel=self._cancel)
                if outputs is None:
                    slicer.util.showStatusMessage(_("Measurement cancelled: no node was added"), 5000)
                    return
                table, changeMap = outputs
                self.ui.qualityTable.setMRMLTableNode(table)
                self._setOutputs([table, changeMap])
            finally:
                self._running(False)

    def onExportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            files = self.logic.export(self._outputNodes, self._parameterNode.exportFolder)
            slicer.util.showStatusMessage(_("Wrote {count} files to {folder}").format(
                count=len(files), folder=self._parameterNode.exportFolder), 5000)

    def onCancelButton(self) -> None:
        self._cancelled = True

    def _setOutputs(self, nodes) -> None:
        self._outputNodes = list(nodes)
        self.ui.exportButton.enabled = bool(self._outputNodes)

    def _running(self, running: bool) -> None:
        """Buttons and the (busy) progress bar while the logic runs."""
        self._cancelled = False
        for button in (self.ui.previewButton, self.ui.applyButton, self.ui.longitudinalButton):
            button.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.setRange(0, 0)  # the number of iterations is not known in advance
        self.ui.progressBar.setVisible(running)
        if not running and self._parameterNode:
            self._onParameterNodeModified()  # Apply only with both inputs chosen

    def _progress(self, stage: str, iteration: int, value: float) -> None:
        """Called by the logic after every step: show where it is, and let Qt handle Cancel."""
        slicer.util.showStatusMessage(_("{stage}: iteration {iteration}").format(stage=stage, iteration=iteration))
        slicer.app.processEvents()

    def _cancel(self) -> bool:
        return self._cancelled


class GeomedShapesLogic(ScriptedLoadableModuleLogic):
    """Calls the tested adapters of ``GeomedShapesLib.logic`` on Slicer's scene."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return GeomedShapesParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """Install geomed on first use, after asking (torch comes from the PyTorch extension, not from here).

        Returns False when the user declines or torch is not available.
        """
        try:
            import geomed  # noqa: F401
            return True
        except ImportError:
            pass
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_("Install the PyTorch extension first (Extensions Manager), then restart."))
            return False
        if PyTorchUtils.PyTorchUtilsLogic().torch is None:
            return False
        from slicer import pydeps

        try:  # pip_ensure asks the user first (prompt_install) and raises RuntimeError if they decline
            pydeps.pip_ensure(pydeps.load_requirements(self.requirements()), skip_packages=["torch"],
                              prompt_install=True, requester=_("Geomed Shapes"))
        except RuntimeError:
            return False
        return True

    @staticmethod
    def requirements() -> str:
        return str(Path(__file__).parent / "Resources" / "requirements.txt")

    @staticmethod
    def _shapes(parameters) -> dict:
        """Which shape to take from each input: the label of labelmaps, the segment of segmentations."""
        return {"label": parameters.label or None, "moving_segment": parameters.movingSegment or None,
                "fixed_segment": parameters.fixedSegment or None}

    def preview(self, parameters):
        """The two surfaces a registration would take, as scratch models (replaced by the next preview)."""
        from GeomedShapesLib.logic import preview_nodes

        return preview_nodes(slicer.mrmlScene, parameters.movingNode, parameters.fixedNode, **self._shapes(parameters))

    def process(self, parameters, progress=None, cancel=None):
        """Register as the parameters say; the new nodes (``RegistrationOutputs``), or None if cancelled (then no
        node was added)."""
        from GeomedShapesLib.logic import register_nodes

        from geomed.registration import RegistrationCancelled

        with contextlib.suppress(RegistrationCancelled):
            return register_nodes(slicer.mrmlScene, parameters.movingNode, parameters.fixedNode,
                                  **self._shapes(parameters), model=parameters.model, preset=parameters.preset,
                                  loss=parameters.loss, blur=parameters.blur or None,
                                  reach=(parameters.reach or None) if parameters.loss == "sinkhorn" else None,
                                  use_gpu=parameters.useGPU, plot=parameters.plot,
                                  progress=progress, cancel=cancel)
        return None

    def longitudinal(self, parameters, nodes, years, progress=None, cancel=None):
        """One subject's change over time: (table node, change-map model node), or None if cancelled."""
        from GeomedShapesLib.logic import longitudinal_nodes

        from geomed.registration import RegistrationCancelled

        with contextlib.suppress(RegistrationCancelled):
            return longitudinal_nodes(slicer.mrmlScene, nodes, years, label=parameters.label or None,
                                      segment=parameters.timepointSegment or None, preset=parameters.preset,
                                      progress=progress, cancel=cancel)
        return None

    def export(self, nodes, folder):
        from GeomedShapesLib.logic import export_nodes

        if not str(folder) or str(folder) == ".":
            raise ValueError(_("Choose the folder to export to"))
        return export_nodes(nodes, folder)


class GeomedShapesTest(ScriptedLoadableModuleTest):
    """Runs in Slicer in seconds on the CPU: a real hippocampus and a moved copy of it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_rigid_registration_of_a_moved_hippocampus()

    def test_rigid_registration_of_a_moved_hippocampus(self):
        import tempfile

        import numpy as np
        from GeomedShapesLib.nodes import add_model

        from geomed import datasets, mask_to_mesh

        self.delayDisplay("Starting the test")
        mesh = mask_to_mesh(datasets.brain_labels("9861"), "left_hippocampus")
        angle = np.radians(8.0)
        motion = np.eye(4)
        motion[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
        motion[:3, 3] = [2.0, -1.0, 3.0]
        fixed = add_model(slicer.mrmlScene, mesh, "fixed hippocampus")
        moving = add_model(slicer.mrmlScene, mesh.transformed(motion), "moving hippocampus")
        parameters = GeomedShapesLogic().getParameterNode()
        parameters.fixedNode, parameters.movingNode, parameters.model = fixed, moving, "rigid"
        outputs = GeomedShapesLogic().process(parameters)
        matrix = slicer.util.arrayFromTransformMatrix(outputs.transform)
        points = np.c_[mesh.vertices, np.ones(mesh.n_vertices)]
        self.assertLess(np.abs(points @ (matrix @ motion).T - points).max(), 0.1)  # mm over the shape
        self.assertEqual(slicer.util.arrayFromModelPoints(moving).shape, (mesh.n_vertices, 3))
        self.assertIsNot(outputs.warped, moving)
        with tempfile.TemporaryDirectory() as folder:
            files = GeomedShapesLogic().export(outputs.nodes(), Path(folder))
            self.assertEqual(sorted(path.suffix for path in files), [".csv", ".h5", ".vtk"])
        self.delayDisplay("Test passed")
