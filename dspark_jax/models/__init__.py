"""Target and draft model definitions (pure-functional Flax Linen).

One legend of einsum letters holds in every file of the project; shape comments use the same
letters in capitals ([B, T, N, D], ...):

    b  batch (sequences)            t  query tokens            s  key/value slots (positions)
    h  hidden size                  f  input features          i  MLP intermediate size
    n  query heads                  k  key/value heads         r  query heads per k/v head (n = k r)
    d  head dim                     v  vocabulary              m  Markov-head rank
    a  blocks (anchors) of a sequence                          g  slots of a block (gamma)
    j, l  a block's slots as queries and as keys
"""
