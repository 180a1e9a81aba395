"""What a run writes besides its label files: per-nucleus measurements, exports for other tools (ROIs, GeoJSON,
OME-TIFF), the manifest, output paths and the run report.

Imports from the project: pipeline.config, pipeline.io, pipeline.labels.
"""
