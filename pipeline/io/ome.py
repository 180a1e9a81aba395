"""OME-Zarr metadata: the multiscales list, a level's axes, the channels' names (0.4 and 0.5)."""
from __future__ import annotations


def ome_multiscales(attributes: dict) -> list:
    """OME-Zarr's `multiscales` list (0.4: in the group's attributes; 0.5: under their `ome` key), or []."""
    return list(attributes.get("ome", {}).get("multiscales") or attributes.get("multiscales") or [])


def ome_axes(multiscale: dict, ndim: int) -> str:
    """The axes of an OME-Zarr level as TiffWindows' letters (Y, X, C, Z, T; anything else Q, read at its first plane)."""
    names = [axis["name"] if isinstance(axis, dict) else str(axis) for axis in multiscale.get("axes", [])]
    if len(names) != ndim:  # OME-Zarr before 0.3 has no axes: t, c, z, y, x
        names = ["t", "c", "z", "y", "x"][-ndim:]
    return "".join({"y": "Y", "x": "X", "c": "C", "z": "Z", "t": "T"}.get(name.lower(), "Q") for name in names)


def ome_channel_names(attributes: dict) -> list[str]:
    """The channel labels of an OME-Zarr image (`omero.channels[].label`, 0.4 and 0.5), or []."""
    omero = attributes.get("ome", {}).get("omero") or attributes.get("omero") or {}
    return [str(channel.get("label", "")) for channel in omero.get("channels", []) if isinstance(channel, dict)]
