"""The card stage: a Hub model card written offline from the recipe, eval and export reports."""
