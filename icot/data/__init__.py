"""Task data: multiplication generation, the `INPUT||COT #### ANSWER` reader and the file checker."""
