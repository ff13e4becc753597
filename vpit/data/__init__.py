"""vpit data: readers, data cards, validation, tokenisation, collation and mixtures."""
