"""napari plugin (npe2, napari.yaml): a "Segment nuclei" dock widget, a sample image and a reader for an output
folder of jobs/segment.py. `_core` holds what it computes (no Qt, no napari: tested headless); `_widget` is the Qt side."""
