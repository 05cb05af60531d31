"""`python -m simpo_ray.guide`: print the guide's tables."""

from simpo_ray.guide import format_table

print(format_table())
