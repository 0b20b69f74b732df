"""Steps: the Step contract (base.py) and one module per step kind (see augment_ray.kinds)."""
