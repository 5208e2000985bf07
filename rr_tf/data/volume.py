"""The in-memory volume every reader returns and every later stage consumes.

Geometry convention (same as nibabel): ``affine`` maps voxel indices
``(i, j, k, 1)`` of ``array`` to world coordinates in millimetres in the RAS+
frame (x grows towards the patient's Right, y Anterior, z Superior).
DICOM's LPS patient coordinates are converted on reading
(x and y change sign).
"""

import dataclasses

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass
class Volume:
    """A 3D scalar volume with its geometry.

    Attributes:
      array: 3D array indexed ``[i, j, k]``. Images are float32 in Hounsfield
        units after any rescale slope/intercept; label maps keep integers.
      affine: 4x4 float64, voxel index -> RAS+ world millimetres.
      source: where the data came from (file or folder path), for messages.
      meta: free metadata (patient_id, series_uid, original dtype, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def shape(self):
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self):
        """Voxel size along each array axis in mm (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))
