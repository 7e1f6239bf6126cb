"""Stage 04: codes on evaluation texts, their examples, labels and names, published as one set."""
