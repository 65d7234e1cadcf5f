"""Everything beyond R1-AQA that changes training, each chosen by a flag through train.recipe_for."""
