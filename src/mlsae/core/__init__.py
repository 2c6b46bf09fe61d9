"""Foundation shared by every stage: errors, configuration dataclasses, atomic file IO, compute
device/dtype. Imports nothing else of mlsae."""
