"""Judge actors: hosts of the user's judge class, and the pool that scores (and corrects) a round."""
