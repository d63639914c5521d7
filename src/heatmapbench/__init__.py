"""heatmapbench: objective evaluation of explanation heatmaps by region perturbation.

Samek, Binder, Montavon, Lapuschkin, Müller, "Evaluating the visualization of what a
Deep Neural Network has learned", arXiv 1509.06321.
"""

__version__ = "0.1.0"
