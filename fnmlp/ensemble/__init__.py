"""Ensembles: K networks of one architecture trained by one step (``fnmlp.Ensemble``)."""

from fnmlp.ensemble._ensemble import Ensemble, Prediction
from fnmlp.ensemble._fit import EnsembleFitResult, EnsembleHistory
from fnmlp.ensemble._step import EnsembleStep

__all__ = ["Ensemble", "EnsembleStep", "Prediction", "EnsembleFitResult", "EnsembleHistory"]
