"""The intermediate representation: types, architecture signatures, the op graph and lowering."""
