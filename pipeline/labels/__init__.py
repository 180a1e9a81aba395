"""Label-image maths: instances from probabilities, clump splitting, the false-positive filter, the outline
refiner and the competition's metric. Pure NumPy / SciPy / scikit-image on arrays.

Imports from the project: nothing outside this folder.
"""
