//! `#[derive(Adaptable)]`: lists a composite module's adapter sites under their Hugging Face
//! paths. See `peft_core::Adaptable`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input};

/// Derive `peft_core::Adaptable` for a struct or an enum.
///
/// - Each field is a path segment named after the field; `#[peft(rename = "self")]` renames it
///   (for Hugging Face names that are not Rust identifiers).
/// - `#[peft(skip)]` and `#[module(skip)]` fields are ignored.
/// - `#[peft(flatten)]` visits a field without adding a segment.
/// - On the type, `#[peft(output_layer = "lm_head")]` names the output layer (the output
///   embeddings) that `target_modules = "all-linear"` always leaves out, and
///   `#[peft(classifier_head = "score")]` the classification head it leaves out when the method's
///   `task_type` is `SEQ_CLS` (PEFT's `_maybe_include_all_linear_layers`).
/// - On the type, `#[peft(default_targets = "path::to::fn")]` names a function
///   `fn(&Self, &str) -> Option<DefaultTargets>` that answers `Adaptable::default_targets`
///   (PEFT's per-model-type default `target_modules`).
/// - Enum variants with one field are transparent (no segment); `output_layer`,
///   `classifier_head` and `default_targets` are those of the variant held.
///
/// The generated code refers to `peft_core` when the crate depends on it, else to
/// `burn_peft::core`; `#[peft(crate = "path")]` overrides this.
#[proc_macro_derive(Adaptable, attributes(peft))]
pub fn derive_adaptable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

#[derive(Default)]
struct FieldOpts {
    rename: Option<String>,
    skip: bool,
    flatten: bool,
}

fn field_opts(attrs: &[syn::Attribute]) -> syn::Result<FieldOpts> {
    let mut opts = FieldOpts::default();
    for attr in attrs {
        if attr.path().is_ident("peft") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    let lit: LitStr = meta.value()?.parse()?;
                    opts.rename = Some(lit.value());
                    Ok(())
                } else if meta.path.is_ident("skip") {
                    opts.skip = true;
                    Ok(())
                } else if meta.path.is_ident("flatten") {
                    opts.flatten = true;
                    Ok(())
                } else {
                    Err(meta.error("expected `rename = \"...\"`, `skip` or `flatten`"))
                }
            })?;
        } else if attr.path().is_ident("module") {
            // Burn's `#[module(skip)]` fields are runtime state, never sites.
            let _ = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("skip") {
                    opts.skip = true;
                }
                Ok(())
            });
        }
    }
    Ok(opts)
}

struct TypeOpts {
    krate: syn::Path,
    output_layer: Option<String>,
    classifier_head: Option<String>,
    default_targets: Option<syn::Path>,
}

/// Where `peft_core` is reachable from the crate being compiled: `peft_core` itself when it is a
/// dependency, else through the `burn-peft` facade.
fn default_crate_path() -> syn::Path {
    use proc_macro_crate::{FoundCrate, crate_name};
    match crate_name("peft-core") {
        Ok(FoundCrate::Name(name)) => {
            let ident = format_ident!("{name}");
            syn::parse_quote!(::#ident)
        }
        Ok(FoundCrate::Itself) => syn::parse_quote!(::peft_core),
        Err(_) => match crate_name("burn-peft") {
            Ok(FoundCrate::Name(name)) => {
                let ident = format_ident!("{name}");
                syn::parse_quote!(::#ident::core)
            }
            Ok(FoundCrate::Itself) => syn::parse_quote!(::burn_peft::core),
            Err(_) => syn::parse_quote!(::peft_core),
        },
    }
}

fn type_opts(attrs: &[syn::Attribute]) -> syn::Result<TypeOpts> {
    let mut krate: syn::Path = default_crate_path();
    let mut output_layer = None;
    let mut classifier_head = None;
    let mut default_targets = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("peft")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let lit: LitStr = meta.value()?.parse()?;
                krate = lit.parse()?;
                Ok(())
            } else if meta.path.is_ident("output_layer") {
                let lit: LitStr = meta.value()?.parse()?;
                output_layer = Some(lit.value());
                Ok(())
            } else if meta.path.is_ident("classifier_head") {
                let lit: LitStr = meta.value()?.parse()?;
                classifier_head = Some(lit.value());
                Ok(())
            } else if meta.path.is_ident("default_targets") {
                let lit: LitStr = meta.value()?.parse()?;
                default_targets = Some(lit.parse()?);
                Ok(())
            } else {
                Err(meta.error(
                    "expected `crate = \"...\"`, `output_layer = \"...\"`, \
                     `classifier_head = \"...\"` or `default_targets = \"...\"`",
                ))
            }
        })?;
    }
    Ok(TypeOpts {
        krate,
        output_layer,
        classifier_head,
        default_targets,
    })
}

/// Code visiting one field reachable as `access` (an expression yielding a reference).
fn visit_field(
    krate: &syn::Path,
    segment: Option<String>,
    access: TokenStream2,
    mutable: bool,
) -> TokenStream2 {
    let call = if mutable {
        quote!(#krate::Adaptable::visit_sites_mut(#access, path, visitor);)
    } else {
        quote!(#krate::Adaptable::visit_sites(#access, path, visitor);)
    };
    match segment {
        Some(seg) => quote! {
            path.push(#seg);
            #call
            path.pop();
        },
        None => call,
    }
}

fn fields_body(
    krate: &syn::Path,
    fields: &Fields,
    mutable: bool,
    binding: &dyn Fn(usize, &syn::Field) -> TokenStream2,
) -> syn::Result<TokenStream2> {
    let mut body = TokenStream2::new();
    for (i, field) in fields.iter().enumerate() {
        let opts = field_opts(&field.attrs)?;
        if opts.skip {
            continue;
        }
        let name = opts.rename.clone().or_else(|| {
            Some(
                field
                    .ident
                    .as_ref()
                    .map(|id| id.to_string().trim_start_matches("r#").to_string())
                    .unwrap_or_else(|| i.to_string()),
            )
        });
        let segment = if opts.flatten { None } else { name };
        body.extend(visit_field(krate, segment, binding(i, field), mutable));
    }
    Ok(body)
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let opts = type_opts(&input.attrs)?;
    let krate = &opts.krate;
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();

    // For enums, `output_layer` / `classifier_head` delegate to the variant held; without this
    // an `HfModel` would report no output layer and `all-linear` would adapt `lm_head`.
    let (visit, visit_mut, delegated) = match &input.data {
        Data::Struct(data) => {
            let access = |mutable: bool| {
                move |i: usize, field: &syn::Field| {
                    let member = match &field.ident {
                        Some(id) => quote!(#id),
                        None => {
                            let index = syn::Index::from(i);
                            quote!(#index)
                        }
                    };
                    if mutable {
                        quote!(&mut self.#member)
                    } else {
                        quote!(&self.#member)
                    }
                }
            };
            (
                fields_body(krate, &data.fields, false, &access(false))?,
                fields_body(krate, &data.fields, true, &access(true))?,
                None,
            )
        }
        Data::Enum(data) => {
            let mut arms = TokenStream2::new();
            let mut arms_mut = TokenStream2::new();
            let mut output_arms = TokenStream2::new();
            let mut classifier_arms = TokenStream2::new();
            let mut targets_arms = TokenStream2::new();
            for variant in &data.variants {
                let vname = &variant.ident;
                let (pattern, bindings): (TokenStream2, Vec<syn::Ident>) = match &variant.fields {
                    Fields::Unit => (quote!(Self::#vname), vec![]),
                    Fields::Unnamed(f) => {
                        let b: Vec<_> = (0..f.unnamed.len())
                            .map(|i| format_ident!("f{i}"))
                            .collect();
                        (quote!(Self::#vname( #(#b),* )), b)
                    }
                    Fields::Named(f) => {
                        let b: Vec<_> = f.named.iter().map(|x| x.ident.clone().unwrap()).collect();
                        (quote!(Self::#vname { #(#b),* }), b)
                    }
                };
                let single = variant.fields.len() == 1;
                let bind = |i: usize, _f: &syn::Field| {
                    let b = &bindings[i];
                    quote!(#b)
                };
                let body = |mutable: bool| -> syn::Result<TokenStream2> {
                    if single {
                        let field = variant.fields.iter().next().unwrap();
                        let o = field_opts(&field.attrs)?;
                        if o.skip {
                            return Ok(TokenStream2::new());
                        }
                        let b = &bindings[0];
                        Ok(visit_field(krate, o.rename, quote!(#b), mutable))
                    } else {
                        fields_body(krate, &variant.fields, mutable, &bind)
                    }
                };
                let (b, bm) = (body(false)?, body(true)?);
                if single && matches!(variant.fields, Fields::Unnamed(_)) {
                    output_arms
                        .extend(quote!(Self::#vname(f0) => #krate::Adaptable::output_layer(f0),));
                    classifier_arms.extend(
                        quote!(Self::#vname(f0) => #krate::Adaptable::classifier_head(f0),),
                    );
                    targets_arms.extend(quote!(
                        Self::#vname(f0) => #krate::Adaptable::default_targets(f0, table),
                    ));
                } else {
                    let none = quote!(#[allow(unused_variables)] #pattern => ::core::option::Option::None,);
                    output_arms.extend(none.clone());
                    classifier_arms.extend(none.clone());
                    targets_arms.extend(none);
                }
                arms.extend(quote!(#[allow(unused_variables)] #pattern => { #b }));
                arms_mut.extend(quote!(#[allow(unused_variables)] #pattern => { #bm }));
            }
            (
                quote!(match self { #arms }),
                quote!(match self { #arms_mut }),
                Some((
                    quote!(match self { #output_arms }),
                    quote!(match self { #classifier_arms }),
                    quote!(match self { #targets_arms }),
                )),
            )
        }
        Data::Union(u) => {
            return Err(syn::Error::new_spanned(
                u.union_token,
                "Adaptable cannot be derived for unions",
            ));
        }
    };

    let named =
        |name: &Option<String>, delegate: Option<&TokenStream2>, method: TokenStream2| match (
            name, delegate,
        ) {
            (Some(name), _) => quote! {
                fn #method(&self) -> ::core::option::Option<::std::string::String> {
                    ::core::option::Option::Some(::std::string::String::from(#name))
                }
            },
            (None, Some(arms)) => quote! {
                fn #method(&self) -> ::core::option::Option<::std::string::String> {
                    #arms
                }
            },
            (None, None) => quote!(),
        };
    let output_layer = named(
        &opts.output_layer,
        delegated.as_ref().map(|d| &d.0),
        quote!(output_layer),
    );
    let classifier_head = named(
        &opts.classifier_head,
        delegated.as_ref().map(|d| &d.1),
        quote!(classifier_head),
    );

    let default_targets = match (&opts.default_targets, delegated.as_ref().map(|d| &d.2)) {
        (Some(function), _) => quote! {
            fn default_targets(
                &self,
                table: &str,
            ) -> ::core::option::Option<#krate::DefaultTargets> {
                #function(self, table)
            }
        },
        (None, Some(arms)) => quote! {
            fn default_targets(
                &self,
                table: &str,
            ) -> ::core::option::Option<#krate::DefaultTargets> {
                #arms
            }
        },
        (None, None) => quote!(),
    };

    Ok(quote! {
        impl #impl_generics #krate::Adaptable for #ident #ty_generics #where_clause {
            fn visit_sites(
                &self,
                path: &mut #krate::SitePath,
                visitor: &mut dyn FnMut(&#krate::SitePath, #krate::Site<'_>),
            ) {
                #visit
            }

            fn visit_sites_mut(
                &mut self,
                path: &mut #krate::SitePath,
                visitor: &mut dyn FnMut(&#krate::SitePath, #krate::SiteMut<'_>),
            ) {
                #visit_mut
            }

            #output_layer

            #classifier_head

            #default_targets
        }
    })
}
