"""The tuned lens (SPEC 5): translators T_l, their exact inverse, the space an SAE reads, lens
training and evaluation. May import: core, data."""
