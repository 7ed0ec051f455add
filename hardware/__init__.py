"""Hardware layer (issue 6): serial and radio links whose nodes appear as gateway clients."""
