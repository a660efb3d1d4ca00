"""Customization methods (SPF-Portrait, its ablations and the Table 1 baselines) behind one interface.

The interface, the shared training loop and the registry arrive with the trainer issue; this package
exists so that ``spfbench`` and ``trainers`` are installed and importable side by side.
"""
