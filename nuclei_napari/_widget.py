"""The "Segment nuclei" dock widget (magicgui): the selected image layer segmented off the UI thread, with progress,
into a Labels layer whose features are the nuclei's measurements. Qt and napari are imported when it is built."""
from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui import magic_factory

from nuclei_napari import _core

if TYPE_CHECKING:  # magicgui resolves the annotations' names itself, when the widget is built
    import napari


def _start(viewer, layer, model: str, threshold: float, channel: str, pixel_size_um: float):
    from napari.layers import Layer
    from napari.qt.threading import create_worker  # needs Qt: napari's own, there when the widget is

    worker = create_worker(_core.segment_steps, layer.data, name=layer.name, model=model, threshold=threshold,
                           channel=channel, pixel_size_um=pixel_size_um,
                           _progress={"total": _core.SEGMENT_STEPS, "desc": "Segmenting nuclei"})
    worker.returned.connect(lambda data: viewer.add_layer(Layer.create(*data)))
    worker.start()
    return worker


@magic_factory(call_button="Segment",
               model={"tooltip": "a shipped model's name or a model.keras / model.onnx path"},
               threshold={"min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "0: the model's stored setting"},
               channel={"tooltip": "nuclear channel of a stack (name or index); empty: named stain, else 0"},
               pixel_size_um={"min": 0.0, "step": 0.01, "tooltip": "micrometres per pixel (0: unknown)"})
def segment_nuclei_widget(viewer: "napari.viewer.Viewer", image: "napari.layers.Image", model: str = "dsb2018",
                          threshold: float = 0.0, channel: str = "", pixel_size_um: float = 0.0):
    if image is not None:
        return _start(viewer, image, model, threshold, channel, pixel_size_um)
