//! `#[behaviour]`: turns an `impl` block into an Academy behaviour.
//!
//! Inside the block, mark methods with `#[action]`, `#[control_loop]`,
//! `#[timer(every = <Duration expr>)]`, `#[on_startup]`, `#[on_shutdown]`,
//! `#[state]` (a `fn(&self) -> &Mutex<S>`: the state the runtime keeps) and
//! `#[migrate_state]` (a `fn(from: u32, serde_json::Value) ->
//! Result<serde_json::Value, String>`); `#[behaviour(state_version = N)]`
//! versions the state.
//! The macro implements `academy_sdk::Behaviour` and generates `<Type>Actions`,
//! the typed methods of `Handle<Type>`. See the `academy-sdk` docs.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{
    Attribute, Expr, FnArg, GenericArgument, ImplItem, ImplItemFn, ItemImpl, LitStr, Meta, Pat,
    PathArguments, ReturnType, Token, Type,
};

/// Names a handle already uses for its own methods.
const RESERVED: &[&str] = &["ping", "shutdown", "id", "with_timeout", "raw", "unbound"];

#[proc_macro_attribute]
pub fn behaviour(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(input as ItemImpl);
    let args = syn::parse_macro_input!(args with Punctuated::<Meta, Token![,]>::parse_terminated);
    expand(args, item).unwrap_or_else(syn::Error::into_compile_error).into()
}

enum Role {
    /// An action; `true` when read-only.
    Action(bool),
    Loop,
    Timer(Expr),
    Startup,
    Shutdown,
    State,
    Migrate,
}

fn take_role(attrs: &mut Vec<Attribute>) -> syn::Result<Option<Role>> {
    let mut role = None;
    let mut error = None;
    attrs.retain(|attr| {
        let found = if attr.path().is_ident("action") {
            Some(action_options(attr).map(Role::Action))
        } else if attr.path().is_ident("control_loop") {
            Some(Ok(Role::Loop))
        } else if attr.path().is_ident("on_startup") {
            Some(Ok(Role::Startup))
        } else if attr.path().is_ident("on_shutdown") {
            Some(Ok(Role::Shutdown))
        } else if attr.path().is_ident("state") {
            Some(Ok(Role::State))
        } else if attr.path().is_ident("migrate_state") {
            Some(Ok(Role::Migrate))
        } else if attr.path().is_ident("timer") {
            Some(timer_period(attr).map(Role::Timer))
        } else {
            None
        };
        match found {
            None => true,
            Some(Ok(r)) => {
                if role.replace(r).is_some() {
                    error = Some(syn::Error::new(attr.span(), "a method can have one role only"));
                }
                false
            }
            Some(Err(e)) => {
                error = Some(e);
                false
            }
        }
    });
    error.map_or(Ok(role), Err)
}

/// Whether `#[action]` says `read_only`: the only option it takes.
fn action_options(attr: &Attribute) -> syn::Result<bool> {
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return Ok(false);
    }
    let option: syn::Ident = attr.parse_args()?;
    if option != "read_only" {
        return Err(syn::Error::new(option.span(), "#[action] takes only `read_only`"));
    }
    Ok(true)
}

fn timer_period(attr: &Attribute) -> syn::Result<Expr> {
    let meta: syn::MetaNameValue = attr.parse_args()?;
    if !meta.path.is_ident("every") {
        return Err(syn::Error::new(meta.path.span(), "expected #[timer(every = <Duration>)]"));
    }
    Ok(meta.value)
}

/// What an action returns: its Ok type and whether it is a `Result`.
fn output(ret: &ReturnType) -> (Type, bool) {
    let ReturnType::Type(_, ty) = ret else {
        return (syn::parse_quote!(()), false);
    };
    if let Type::Path(path) = &**ty
        && let Some(last) = path.path.segments.last()
        && last.ident == "Result"
        && let PathArguments::AngleBracketed(generic) = &last.arguments
        && let Some(GenericArgument::Type(ok)) = generic.args.first()
    {
        return (ok.clone(), true);
    }
    ((**ty).clone(), false)
}

/// The text of the doc comments among `attrs`.
fn doc_text(attrs: &[Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            Meta::NameValue(syn::MetaNameValue {
                value: Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }),
                ..
            }) => Some(s.value()),
            _ => None,
        })
        .map(|line| line.strip_prefix(' ').map(str::to_owned).unwrap_or(line))
        .collect();
    lines.join("\n").trim().to_owned()
}

fn check_method(method: &ImplItemFn, what: &str) -> syn::Result<()> {
    if method.sig.asyncness.is_none() {
        return Err(syn::Error::new(method.sig.fn_token.span, format!("{what} must be async")));
    }
    match method.sig.inputs.first() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => Ok(()),
        _ => Err(syn::Error::new(
            method.sig.span(),
            format!("{what} must take &self (share state with interior mutability)"),
        )),
    }
}

fn params(method: &ImplItemFn) -> syn::Result<Vec<(syn::Ident, Type)>> {
    method
        .sig
        .inputs
        .iter()
        .skip(1)
        .map(|arg| match arg {
            FnArg::Typed(pt) => match &*pt.pat {
                Pat::Ident(id) => Ok((id.ident.clone(), (*pt.ty).clone())),
                other => Err(syn::Error::new(other.span(), "parameters must be plain names")),
            },
            FnArg::Receiver(r) => Err(syn::Error::new(r.span(), "unexpected receiver")),
        })
        .collect()
}

fn hook(ident: &syn::Ident) -> Tokens {
    quote! {
        ::std::boxed::Box::pin(async move {
            ::academy_sdk::__private::HookOutcome::into_hook_outcome(self.#ident().await)
        })
    }
}

fn expand(args: Punctuated<Meta, Token![,]>, mut item: ItemImpl) -> syn::Result<Tokens> {
    if item.trait_.is_some() || !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.span(),
            "#[behaviour] goes on a plain, non-generic impl block",
        ));
    }
    let self_ty = item.self_ty.clone();
    let type_ident = match &*self_ty {
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    }
    .ok_or_else(|| syn::Error::new(self_ty.span(), "expected a type name"))?;

    let mut name = LitStr::new(&type_ident.to_string(), type_ident.span());
    let mut implements: Vec<LitStr> = Vec::new();
    let mut state_version = None;
    for arg in args {
        match arg {
            Meta::NameValue(nv) if nv.path.is_ident("state_version") => {
                state_version = match &nv.value {
                    Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(n), .. }) => {
                        Some(n.base10_parse::<u32>()?)
                    }
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            "state_version must be a number",
                        ));
                    }
                };
            }
            Meta::NameValue(nv) if nv.path.is_ident("name") => {
                name = match &nv.value {
                    Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) => s.clone(),
                    other => return Err(syn::Error::new(other.span(), "name must be a string")),
                };
            }
            Meta::List(list) if list.path.is_ident("implements") => {
                implements = list
                    .parse_args_with(Punctuated::<LitStr, Token![,]>::parse_terminated)?
                    .into_iter()
                    .collect();
            }
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "expected name = \"...\", implements(\"...\", ...) or state_version = N",
                ));
            }
        }
    }

    let mut action_names = Vec::new();
    let mut read_only = Vec::new();
    let mut described = Vec::new();
    let behaviour_doc = doc_text(&item.attrs);
    let mut dispatch_arms = Vec::new();
    let mut handle_methods = Vec::new();
    let mut loops = Vec::new();
    let mut startup = None;
    let mut shutdown = None;
    let mut state = None;
    let mut migrate = None;

    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        let Some(role) = take_role(&mut method.attrs)? else {
            continue;
        };
        let ident = method.sig.ident.clone();
        let label = ident.to_string();
        match role {
            Role::Action(only_reads) => {
                check_method(method, "an action")?;
                if RESERVED.contains(&label.as_str()) {
                    return Err(syn::Error::new(
                        ident.span(),
                        format!("action name {label:?} is reserved by handles ({RESERVED:?})"),
                    ));
                }
                let params = params(method)?;
                let (ok, fallible) = output(&method.sig.output);
                let names: Vec<_> = params.iter().map(|(n, _)| n.to_string()).collect();
                let call_args: Vec<_> = params.iter().map(|(n, _)| n).collect();
                let types: Vec<_> = params.iter().map(|(_, ty)| ty).collect();
                let indices = 0..params.len();
                let check = fallible
                    .then(|| quote! { let __out = ::academy_sdk::__private::fallible(__out)?; });
                dispatch_arms.push(quote! {
                    #label => {
                        let (#(#call_args,)*): (#(#types,)*) = ::academy_sdk::__private::decode_args(
                            #label,
                            &[#(#names),*],
                            __payload.as_ref(),
                            |__args| ::std::result::Result::Ok((#(__args.take(#indices)?,)*)),
                        )?;
                        let __codec = ::academy_sdk::__private::reply_codec(__payload.as_ref());
                        let __out = self.#ident(#(#call_args),*).await;
                        #check
                        ::academy_sdk::__private::encode_result(#label, __codec, &__out)
                    }
                });
                let docs = method.attrs.iter().filter(|a| a.path().is_ident("doc"));
                let typed = params.iter().map(|(n, ty)| quote! { #n: #ty });
                handle_methods.push(quote! {
                    #(#docs)*
                    pub async fn #ident(&self, #(#typed),*) -> ::std::result::Result<#ok, ::academy_sdk::HandleError> {
                        self.0.call(#label, (#(#call_args,)*)).await
                    }
                });
                if only_reads {
                    read_only.push(label.clone());
                }
                let doc = doc_text(&method.attrs);
                described.push(quote! {
                    ::academy_sdk::__private::ActionDoc {
                        name: #label,
                        doc: #doc,
                        params: &[#(#names),*],
                        read_only: #only_reads,
                        schemas: |__generator| {
                            #[allow(unused_imports)]
                            use ::academy_sdk::__private::{Typed as _, Untyped as _};
                            (
                                ::std::vec![#((&::academy_sdk::__private::Probe::<#types>::new()).schema(__generator)),*],
                                (&::academy_sdk::__private::Probe::<#ok>::new()).schema(__generator),
                            )
                        },
                    }
                });
                action_names.push(label);
            }
            Role::Loop => {
                check_method(method, "a control loop")?;
                if method.sig.inputs.len() != 2 {
                    return Err(syn::Error::new(
                        method.sig.span(),
                        "a control loop takes (&self, shutdown: academy_sdk::Shutdown)",
                    ));
                }
                loops.push(quote! {
                    ::academy_sdk::ControlLoop {
                        name: #label,
                        run: {
                            let this = ::std::sync::Arc::clone(self);
                            let shutdown = ::std::clone::Clone::clone(shutdown);
                            ::std::boxed::Box::pin(async move {
                                ::academy_sdk::__private::HookOutcome::into_hook_outcome(this.#ident(shutdown).await)
                            })
                        },
                    }
                });
            }
            Role::Timer(period) => {
                check_method(method, "a timer")?;
                if method.sig.inputs.len() != 1 {
                    return Err(syn::Error::new(method.sig.span(), "a timer takes only &self"));
                }
                loops.push(quote! {
                    ::academy_sdk::ControlLoop {
                        name: #label,
                        run: {
                            let this = ::std::sync::Arc::clone(self);
                            let period: ::std::time::Duration = #period;
                            ::std::boxed::Box::pin(::academy_sdk::__private::every(
                                period,
                                ::std::clone::Clone::clone(shutdown),
                                move || {
                                    let this = ::std::sync::Arc::clone(&this);
                                    async move {
                                        ::academy_sdk::__private::HookOutcome::into_hook_outcome(this.#ident().await)
                                    }
                                },
                            ))
                        },
                    }
                });
            }
            Role::State => {
                let by_ref = matches!(method.sig.inputs.first(), Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none());
                if method.sig.asyncness.is_some() || !by_ref || method.sig.inputs.len() != 1 {
                    return Err(syn::Error::new(
                        method.sig.span(),
                        "#[state] goes on a plain fn(&self) -> &std::sync::Mutex<S>, S a serde type",
                    ));
                }
                if state.replace(ident.clone()).is_some() {
                    return Err(syn::Error::new(ident.span(), "only one #[state]"));
                }
            }
            Role::Migrate => {
                if method.sig.asyncness.is_some()
                    || method.sig.inputs.len() != 2
                    || matches!(method.sig.inputs.first(), Some(FnArg::Receiver(_)))
                {
                    return Err(syn::Error::new(
                        method.sig.span(),
                        "#[migrate_state] goes on a plain fn(from: u32, value: serde_json::Value) -> Result<serde_json::Value, String>",
                    ));
                }
                if migrate.replace(ident.clone()).is_some() {
                    return Err(syn::Error::new(ident.span(), "only one #[migrate_state]"));
                }
            }
            Role::Startup | Role::Shutdown => {
                check_method(method, "a hook")?;
                let slot = if matches!(role, Role::Startup) { &mut startup } else { &mut shutdown };
                if slot.replace(hook(&ident)).is_some() {
                    return Err(syn::Error::new(ident.span(), "only one hook of each kind"));
                }
            }
        }
    }

    let actions_ident = format_ident!("{}Actions", type_ident);
    let doc = format!("Typed actions of a `Handle<{type_ident}>` (generated by `#[behaviour]`).");
    let startup = startup.map(|body| {
        quote! {
            fn on_startup(self: ::std::sync::Arc<Self>) -> ::academy_sdk::__private::BoxFuture<'static, ::std::result::Result<(), ::std::string::String>> { #body }
        }
    });
    let shutdown_fn = shutdown.map(|body| {
        quote! {
            fn on_shutdown(self: ::std::sync::Arc<Self>) -> ::academy_sdk::__private::BoxFuture<'static, ::std::result::Result<(), ::std::string::String>> { #body }
        }
    });
    let state_fn = state.map(|ident| {
        quote! {
            fn state(&self) -> ::std::option::Option<&dyn ::academy_sdk::Durable> {
                ::std::option::Option::Some(self.#ident())
            }
        }
    });
    let migrate_fn = migrate.map(|ident| {
        quote! {
            fn migrate_state(
                from: u32,
                value: ::academy_sdk::__private::JsonValue,
            ) -> ::std::result::Result<::academy_sdk::__private::JsonValue, ::std::string::String> {
                Self::#ident(from, value)
            }
        }
    });
    let version = state_version.map(|n| quote! { const STATE_VERSION: u32 = #n; });
    let loops_fn = (!loops.is_empty()).then(|| {
        quote! {
            fn loops(self: &::std::sync::Arc<Self>, shutdown: &::academy_sdk::Shutdown) -> ::std::vec::Vec<::academy_sdk::ControlLoop> {
                ::std::vec![#(#loops),*]
            }
        }
    });
    Ok(quote! {
        #item

        #[doc = #doc]
        #[derive(Clone, Debug)]
        pub struct #actions_ident(::academy_sdk::RawHandle);

        impl ::std::convert::From<::academy_sdk::RawHandle> for #actions_ident {
            fn from(raw: ::academy_sdk::RawHandle) -> Self { Self(raw) }
        }

        impl ::std::convert::AsRef<::academy_sdk::RawHandle> for #actions_ident {
            fn as_ref(&self) -> &::academy_sdk::RawHandle { &self.0 }
        }

        impl #actions_ident {
            #(#handle_methods)*
        }

        impl ::academy_sdk::Behaviour for #self_ty {
            const NAME: &'static str = #name;
            const IMPLEMENTS: &'static [&'static str] = &[#(#implements),*];
            const ACTIONS: &'static [&'static str] = &[#(#action_names),*];
            const READ_ONLY_ACTIONS: &'static [&'static str] = &[#(#read_only),*];
            type Actions = #actions_ident;

            fn describe() -> ::academy_sdk::__private::AgentDescription {
                ::academy_sdk::__private::describe(#behaviour_doc, &[#(#described),*])
            }

            #[allow(unused_variables, unreachable_code)]
            fn dispatch(
                self: ::std::sync::Arc<Self>,
                __action: ::std::string::String,
                __payload: ::std::option::Option<::academy_sdk::__private::Payload>,
            ) -> ::academy_sdk::__private::BoxFuture<'static, ::std::result::Result<::academy_sdk::__private::Payload, ::academy_sdk::ActionError>> {
                ::std::boxed::Box::pin(async move {
                    match __action.as_str() {
                        #(#dispatch_arms)*
                        other => ::std::result::Result::Err(::academy_sdk::ActionError::unknown_action(
                            other,
                            <Self as ::academy_sdk::Behaviour>::ACTIONS,
                        )),
                    }
                })
            }

            #loops_fn
            #startup
            #shutdown_fn
            #version
            #state_fn
            #migrate_fn
        }
    })
}
