"""What finished searches teach a new one: reading them, parameter counts, trends against model
size, and the warm start of a new search. No Ray, no tensors."""
